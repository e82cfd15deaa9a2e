"""Optional integrations with other tools (each behind its own extra).

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``mlflow`` (every commit visible in MLflow (extra ``mlflow``)): ``MLflowLogger``,
  ``resume_from_mlflow``

Nothing in the library imports this package; each integration is imported by the user.
"""
