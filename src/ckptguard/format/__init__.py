"""The on-disk format: manifest, tensor files, the JSON codec of non-tensor state. Pure bytes; no storage, no I/O.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``manifest`` (MANIFEST.json, the commit marker): ``MANIFEST``, ``FORMAT_VERSION``,
  ``parse_manifest``, ``encode_manifest``
- ``tensorfile`` (safetensors files with xxh3-128 digests): ``write_tensor_file``,
  ``read_tensor_file``
- ``codec`` (pickle-free state trees): ``encode``, ``decode``
- ``safejson`` (bounded JSON and YAML parsing): ``loads``, ``yaml_loads``
"""
