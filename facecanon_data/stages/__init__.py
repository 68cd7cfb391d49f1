"""Pipeline stages. Each is a function of typed config + input artifacts that writes its outputs and a
completion marker; none of them knows how it is scheduled (no Dask imports here)."""
