/* Timers: core.timer() -> cluster.timer with start(ms, repeat_ms, fn), stop, close. */
#include "util.h"

#define TNAME "cluster.timer"

static void on_timer(uv_timer_t *t) {
  cl_handle *h = t->data;
  if (cl_push_cb(h, 0)) cl_call(h->L, 0);
}

static int l_timer(lua_State *L) {
  cl_handle *h = cl_handle_new(L, sizeof(cl_handle), TNAME);
  uv_timer_init(cl_loop(), &h->u.timer);
  return 1;
}

/* t:start(timeout_ms, repeat_ms, fn) */
static int t_start(lua_State *L) {
  cl_handle *h = cl_handle_check(L, 1, TNAME);
  lua_Integer timeout = luaL_checkinteger(L, 2);
  lua_Integer repeat = luaL_optinteger(L, 3, 0);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  luaL_argcheck(L, timeout >= 0, 2, "timeout must be >= 0");
  luaL_argcheck(L, repeat >= 0, 3, "repeat must be >= 0");
  cl_set_cb(L, h, 0, 4);
  uv_timer_start(&h->u.timer, on_timer, (uint64_t)timeout, (uint64_t)repeat);
  return 0;
}

static int t_stop(lua_State *L) {
  cl_handle *h = cl_handle_check(L, 1, TNAME);
  uv_timer_stop(&h->u.timer);
  return 0;
}

static int t_active(lua_State *L) {
  cl_handle **box = luaL_checkudata(L, 1, TNAME);
  lua_pushboolean(L, *box && uv_is_active(&(*box)->u.handle));
  return 1;
}

void cl_open_timer(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"start", t_start}, {"stop", t_stop}, {"active", t_active},
    {"close", cl_handle_close_method}, {"ref", cl_handle_ref_method},
    {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_timer);
  lua_setfield(L, -2, "timer");
}
