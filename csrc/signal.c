/* Signal watchers: core.signal(name, fn(signame)) -> cluster.signal handle. */
#include "util.h"

#define TNAME "cluster.signal"

static void on_signal(uv_signal_t *s, int signum) {
  cl_handle *h = s->data;
  if (cl_push_cb(h, 0)) {
    lua_pushstring(h->L, cl_signal_name(signum));
    cl_call(h->L, 1);
  }
}

static int l_signal(lua_State *L) {
  int sig = cl_check_signal(L, 1, "signal");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  cl_handle *h = cl_handle_new(L, sizeof(cl_handle), TNAME);
  uv_signal_init(cl_loop(), &h->u.signal);
  cl_set_cb(L, h, 0, 2);
  int err = uv_signal_start(&h->u.signal, on_signal, sig);
  if (err) {
    cl_handle_close(h);
    return cl_push_fail(L, err, "signal");
  }
  return 1;
}

/* core.signal_number(v) -> the signal's number for a name ("SIGTERM", "term") or a number
 * core.signal() accepts, or nil: for the Lua layer's own argument checks. */
static int l_signal_number(lua_State *L) {
  int sig = cl_to_signal(L, 1);
  if (sig < 0) lua_pushnil(L);
  else lua_pushinteger(L, sig);
  return 1;
}

void cl_open_signal(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"close", cl_handle_close_method}, {"ref", cl_handle_ref_method},
    {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_signal);
  lua_setfield(L, -2, "signal");
  lua_pushcfunction(L, l_signal_number);
  lua_setfield(L, -2, "signal_number");
}
