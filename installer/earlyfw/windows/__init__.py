"""earlyfw on Windows: the kill switch as Windows Filtering Platform objects.

Windows Firewall's own boot-time policy blocks nothing outbound before the Base
Filtering Engine (BFE) starts, and `netsh wfp` cannot add filters, so earlyfw
talks to BFE itself through fwpuclnt.dll with ctypes:

- `structs`: the x64 layouts of the WFP structures, the GUIDs and constants,
  and the C prototypes of every function earlyfw calls;
- `rules`: the filter set as a pure function of the Config;
- `security`: SIDs and security descriptors (the ALE_USER_ID conditions, the
  data directory's DACL), built and read in pure Python;
- `engine`: the transactions (install, relax, lock, uninstall) against a
  `Backend`, which is either the real DLLs (`backend`, Windows only) or, in
  tests, a recording BFE model (tests/wfp_model.py), so the same code runs on Linux;
- `watcher`: the handshake watcher the scheduled task runs, holding its relax
  permits in a dynamic session;
- `platform`: Windows's side of earlyfw.system (what `earlyfw render|relax|
  lock|status|verify` do here).
"""
