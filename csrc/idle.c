/* The next turn of the loop (Node's setImmediate): core.idle() -> cluster.idle with
 * start(fn), stop, close. While started, fn runs once per turn, before the loop polls,
 * and the poll does not wait; so a call queued from fn runs on the next turn, after the
 * I/O that is ready by then, never in the same one. */
#include "util.h"

#define TNAME "cluster.idle"

static void on_idle(uv_idle_t *i) {
  cl_handle *h = i->data;
  if (cl_push_cb(h, 0)) cl_call(h->L, 0);
}

static int l_idle(lua_State *L) {
  cl_handle *h = cl_handle_new(L, sizeof(cl_handle), TNAME);
  uv_idle_init(cl_loop(), &h->u.idle);
  return 1;
}

/* i:start(fn) */
static int i_start(lua_State *L) {
  cl_handle *h = cl_handle_check(L, 1, TNAME);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  cl_set_cb(L, h, 0, 2);
  uv_idle_start(&h->u.idle, on_idle);
  return 0;
}

static int i_stop(lua_State *L) {
  cl_handle *h = cl_handle_check(L, 1, TNAME);
  uv_idle_stop(&h->u.idle);
  return 0;
}

void cl_open_idle(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"start", i_start}, {"stop", i_stop}, {"close", cl_handle_close_method},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_idle);
  lua_setfield(L, -2, "idle");
}
