/* The event loop, run in the caller's thread: run / poll / stop, and the clock. */
#include "util.h"

static int stop_requested = 0;

/* Re-raises an error kept by cl_call, with its traceback. */
static void raise_pending(lua_State *L) {
  if (cl_take_error(L)) lua_error(L);
}

/* core.run(): runs until nothing is left or stop() is called; returns true if stopped. */
static int l_run(lua_State *L) {
  stop_requested = 0;
  raise_pending(L);
  while (uv_run(cl_loop(), UV_RUN_DEFAULT) != 0) {
    raise_pending(L);
    if (stop_requested) break;
  }
  raise_pending(L);
  lua_pushboolean(L, stop_requested);
  stop_requested = 0;
  return 1;
}

/* core.poll(): runs what is ready without blocking; returns whether work remains. */
static int l_poll(lua_State *L) {
  raise_pending(L);
  int alive = uv_run(cl_loop(), UV_RUN_NOWAIT);
  raise_pending(L);
  lua_pushboolean(L, alive);
  return 1;
}

/* core.run_once(): runs one round; blocks for I/O only when nothing is ready. (libuv's
 * UV_RUN_ONCE runs due timers and then still blocks for I/O, so a 0 ms timer started
 * before the call, as loop.defer's is, would wait for the next unrelated event.) */
static int l_run_once(lua_State *L) {
  raise_pending(L);
  uv_loop_t *loop = cl_loop();
  uv_update_time(loop);
  int alive = uv_run(loop, uv_backend_timeout(loop) == 0 ? UV_RUN_NOWAIT : UV_RUN_ONCE);
  raise_pending(L);
  lua_pushboolean(L, alive);
  return 1;
}

static int l_stop(lua_State *L) {
  (void)L;
  stop_requested = 1;
  uv_stop(cl_loop());
  return 0;
}

static int l_now(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_now(cl_loop()));
  return 1;
}

static int l_update_time(lua_State *L) {
  (void)L;
  uv_update_time(cl_loop());
  return 0;
}

/* Monotonic time in seconds as a float, for measurements. */
static int l_hrtime(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

static int l_alive(lua_State *L) {
  lua_pushboolean(L, uv_loop_alive(cl_loop()));
  return 1;
}

void cl_open_loop(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"run", l_run}, {"poll", l_poll}, {"run_once", l_run_once}, {"stop", l_stop},
    {"now", l_now}, {"update_time", l_update_time}, {"hrtime", l_hrtime}, {"alive", l_alive},
    {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
