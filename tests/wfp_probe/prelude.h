/* Included first by the probe tests/test_windows_layout.py generates: the
 * real mingw-w64 headers the ctypes layouts in earlyfw.windows.structs must match.
 * The probe is compiled and linked for x86_64 Windows, never run: every number
 * it checks is known at compile time. */
#define WIN32_LEAN_AND_MEAN
#include <winsock2.h>
#include <windows.h>
#include <fwpmu.h>
#include <ws2ipdef.h>
#include <iphlpapi.h>
#include <netioapi.h>
#include <sddl.h>
#include <aclapi.h>
#include <stddef.h>
