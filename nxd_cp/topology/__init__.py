"""Who talks to whom: NxD's rank layout (pure), this rank's groups, process-group helpers and the
cross-rank agreement check. The lowest layer of nxd_cp: it imports nothing else of it but
``nxd_cp.compat``."""
