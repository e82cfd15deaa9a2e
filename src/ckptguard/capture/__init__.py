"""State capture and restore into live objects: TrainState, samplers, RNG, model keys, mismatch reports, environment, config.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``state`` (what a run needs to resume): ``TrainState``, ``Stateful``
- ``sampler`` (exact mid-epoch resume): ``ResumableSampler``
- ``rng`` (every generator's state): ``capture_rng``, ``restore_rng``
- ``mismatch`` (what no longer fits, and how it is reported): ``format_mismatch``,
  ``likely_renames``
- ``configdrift`` (today's config against the stored one): ``config_diff``
- ``environment`` (git state, versions, host): ``collect_environment``
"""
