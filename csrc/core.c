/* cluster.core: the C core's entry point. Each concept lives in its own file and adds
 * its functions here through its cl_open_* function. */
#define _GNU_SOURCE /* dladdr */
#include "util.h"

#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <string.h>

/* Keeps this library loaded until the process ends: the orphan guard's thread and
 * libuv's own threads may still run its code after lua_close() would unload it. */
static void pin_library(void) {
  Dl_info info;
  if (dladdr((void *)pin_library, &info) && info.dli_fname)
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

int luaopen_cluster_core(lua_State *L) {
  pin_library();
  /* A write to a connection the peer has reset must fail with EPIPE, not kill the
   * process (Node does the same). */
  signal(SIGPIPE, SIG_IGN);
  /* The loop is made here, once: every handle is made on it (cl_loop() never NULL).
   * libuv's uv_default_loop() gives NULL when it cannot (no descriptor left). */
  if (uv_default_loop() == NULL)
    return luaL_error(L, "cluster.core: cannot create the event loop (%s)", strerror(errno));
  lua_newtable(L);
  cl_open_alloc(L);
  cl_open_loop(L);
  cl_open_timer(L);
  cl_open_idle(L);
  cl_open_codec(L);
  cl_open_process(L);
  cl_open_channel(L);
  cl_open_signal(L);
  cl_open_stream(L);
  cl_open_udp(L);
  cl_open_tty(L);
  cl_open_sys(L);
  cl_open_rr(L);
  lua_pushinteger(L, CL_MAX_MESSAGE);
  lua_setfield(L, -2, "MAX_MESSAGE");
  return 1;
}
