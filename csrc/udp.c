/* UDP sockets: core.udp_new([family]) -> cluster.udp with bind, send, recv_start,
 * recv_stop, getsockname and a few socket options. Addresses are numeric (or
 * "localhost"); events, implicit binding and defaults live in lua/cluster/dgram.lua. */
#include "stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TNAME "cluster.udp"

enum { SLOT_RECV = 0 };

typedef struct {
  uv_udp_send_t req;
  lua_State *L;
  int cb_ref;
  int data_ref;
  int port;
  char host[INET6_ADDRSTRLEN + 16];
} send_req;

uv_handle_t *cl_udp_new(lua_State *L, int family) {
  cl_handle *h = cl_handle_new(L, sizeof(cl_handle), TNAME);
  int err = uv_udp_init_ex(cl_loop(), &h->u.udp, (unsigned)family);
  if (err) {
    /* Never initialised, so never closed: undo cl_handle_new by hand. */
    luaL_unref(L, LUA_REGISTRYINDEX, h->self_ref);
    *h->box = NULL;
    free(h);
    lua_pop(L, 1);
    cl_push_fail(L, err, "socket");
    return NULL;
  }
  return &h->u.handle;
}

/* core.udp_new([family]): family "udp4" / 4, "udp6" / 6, or nil (decided at bind). */
static int l_udp_new(lua_State *L) {
  int family = AF_UNSPEC;
  if (!lua_isnoneornil(L, 1)) {
    const char *s = lua_type(L, 1) == LUA_TSTRING ? lua_tostring(L, 1) : NULL;
    lua_Integer n = lua_isinteger(L, 1) ? lua_tointeger(L, 1) : 0;
    if ((s && strcmp(s, "udp4") == 0) || n == 4) family = AF_INET;
    else if ((s && strcmp(s, "udp6") == 0) || n == 6) family = AF_INET6;
    else luaL_argerror(L, 1, "expected \"udp4\", \"udp6\", 4, 6 or nil");
  }
  return cl_udp_new(L, family) ? 1 : 3;
}

static cl_handle *check_udp(lua_State *L, int idx) { return cl_handle_check(L, idx, TNAME); }

static int check_port(lua_State *L, int idx) {
  lua_Integer port = luaL_checkinteger(L, idx);
  luaL_argcheck(L, port >= 0 && port <= 65535, idx, "port must be in 0..65535");
  return (int)port;
}

static int opt_flag(lua_State *L, int idx, const char *field) {
  lua_getfield(L, idx, field);
  int on = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return on;
}

/* u:bind(host, port[, {reuseAddr=, ipv6Only=}]) -> true | nil, msg, code */
static int u_bind(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  const char *host = luaL_checkstring(L, 2);
  int port = check_port(L, 3);
  unsigned flags = 0;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    if (opt_flag(L, 4, "reuseAddr")) flags |= UV_UDP_REUSEADDR;
    if (opt_flag(L, 4, "ipv6Only")) flags |= UV_UDP_IPV6ONLY;
  }
  struct sockaddr_storage ss;
  int err = cl_parse_addr(host, port, &ss);
  if (err == 0) err = uv_udp_bind(&h->u.udp, (struct sockaddr *)&ss, flags);
  if (err) return cl_push_fail(L, err, "bind");
  lua_pushboolean(L, 1);
  return 1;
}

static void on_send(uv_udp_send_t *s, int status) {
  send_req *r = (send_req *)s;
  lua_State *L = r->L;
  luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
  int cb = r->cb_ref;
  if (cb == LUA_NOREF) {
    free(r);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, cb);
  luaL_unref(L, LUA_REGISTRYINDEX, cb);
  if (status == 0) {
    lua_pushnil(L);
  } else {
    char detail[sizeof r->host + 8];
    snprintf(detail, sizeof detail, "%s:%d", r->host, r->port);
    cl_push_error_object(L, status, "send", detail);
    lua_pushstring(L, r->host);
    lua_setfield(L, -2, "address");
    lua_pushinteger(L, r->port);
    lua_setfield(L, -2, "port");
  }
  free(r);
  cl_call(L, 1);
}

/* u:send(data, host, port[, cb(err)]) -> true | nil, msg, code.
 * The callback always runs later, from the loop. */
static int u_send(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  luaL_argcheck(L, len <= UINT32_MAX, 2, "datagram too large");
  const char *host = luaL_checkstring(L, 3);
  int port = check_port(L, 4);
  if (!lua_isnoneornil(L, 5)) luaL_checktype(L, 5, LUA_TFUNCTION);
  struct sockaddr_storage ss;
  int err = cl_parse_addr(host, port, &ss);
  if (err) return cl_push_fail(L, err, "send");
  send_req *r = calloc(1, sizeof *r);
  if (r == NULL) return luaL_error(L, "out of memory");
  r->L = L;
  r->port = port;
  snprintf(r->host, sizeof r->host, "%s", host);
  lua_pushvalue(L, 2);
  r->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  r->cb_ref = LUA_NOREF;
  if (!lua_isnoneornil(L, 5)) {
    lua_pushvalue(L, 5);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  uv_buf_t buf = uv_buf_init((char *)data, (unsigned)len);
  err = uv_udp_send(&r->req, &h->u.udp, &buf, 1, (struct sockaddr *)&ss, on_send);
  if (err) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->data_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    free(r);
    return cl_push_fail(L, err, "send");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* One buffer for all sockets: each datagram is copied into a Lua string in the
 * receive callback, before libuv allocates again. */
static char recv_buffer[64 * 1024];

static void on_alloc(uv_handle_t *uvh, size_t suggested, uv_buf_t *buf) {
  (void)uvh;
  (void)suggested;
  buf->base = recv_buffer;
  buf->len = sizeof recv_buffer;
}

static void on_recv(uv_udp_t *udp, ssize_t nread, const uv_buf_t *buf,
                    const struct sockaddr *addr, unsigned flags) {
  cl_handle *h = udp->data;
  lua_State *L = h->L;
  if (nread == 0 && addr == NULL) return; /* nothing more to read for now */
  if (!cl_push_cb(h, SLOT_RECV)) return;
  if (nread < 0) {
    cl_push_error_object(L, (int)nread, "recvmsg", NULL);
    cl_call(L, 1);
    return;
  }
  lua_pushnil(L);
  lua_pushlstring(L, buf->base, (size_t)nread);
  cl_push_sockaddr(L, addr);
  lua_pushinteger(L, nread);
  lua_setfield(L, -2, "size");
  if (flags & UV_UDP_PARTIAL) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "truncated");
  }
  cl_call(L, 3);
}

/* u:recv_start(cb(err, data, rinfo{address=, family=, port=, size=})) -> true | nil, msg, code */
static int u_recv_start(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  cl_set_cb(L, h, SLOT_RECV, 2);
  int err = uv_udp_recv_start(&h->u.udp, on_alloc, on_recv);
  if (err && err != UV_EALREADY) return cl_push_fail(L, err, "recv_start");
  lua_pushboolean(L, 1);
  return 1;
}

static int u_recv_stop(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  uv_udp_recv_stop(&h->u.udp);
  return 0;
}

/* u:getsockname() -> {address=, port=, family=} | nil, msg, code */
static int u_getsockname(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  struct sockaddr_storage ss;
  int len = sizeof ss;
  int err = uv_udp_getsockname(&h->u.udp, (struct sockaddr *)&ss, &len);
  if (err) return cl_push_fail(L, err, "getsockname");
  cl_push_sockaddr(L, (struct sockaddr *)&ss);
  return 1;
}

static int push_result(lua_State *L, int err, const char *what) {
  if (err) return cl_push_fail(L, err, what);
  lua_pushboolean(L, 1);
  return 1;
}

/* u:set_broadcast(on), u:set_ttl(n), u:set_multicast_ttl(n), u:set_multicast_loop(on) */
static int u_set_broadcast(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  return push_result(L, uv_udp_set_broadcast(&h->u.udp, lua_toboolean(L, 2)), "setBroadcast");
}

static int u_set_ttl(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  return push_result(L, uv_udp_set_ttl(&h->u.udp, (int)luaL_checkinteger(L, 2)), "setTTL");
}

static int u_set_multicast_ttl(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  return push_result(L, uv_udp_set_multicast_ttl(&h->u.udp, (int)luaL_checkinteger(L, 2)),
                     "setMulticastTTL");
}

static int u_set_multicast_loop(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  return push_result(L, uv_udp_set_multicast_loop(&h->u.udp, lua_toboolean(L, 2)),
                     "setMulticastLoopback");
}

/* u:set_membership(group, interface|nil, join) */
static int u_set_membership(lua_State *L) {
  cl_handle *h = check_udp(L, 1);
  const char *group = luaL_checkstring(L, 2);
  const char *iface = luaL_optstring(L, 3, NULL);
  uv_membership m = lua_toboolean(L, 4) ? UV_JOIN_GROUP : UV_LEAVE_GROUP;
  return push_result(L, uv_udp_set_membership(&h->u.udp, group, iface, m),
                     m == UV_JOIN_GROUP ? "addMembership" : "dropMembership");
}

void cl_open_udp(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"bind", u_bind}, {"send", u_send}, {"recv_start", u_recv_start},
    {"recv_stop", u_recv_stop}, {"getsockname", u_getsockname},
    {"set_broadcast", u_set_broadcast}, {"set_ttl", u_set_ttl},
    {"set_multicast_ttl", u_set_multicast_ttl}, {"set_multicast_loop", u_set_multicast_loop},
    {"set_membership", u_set_membership},
    {"close", cl_handle_close_method}, {"fileno", cl_handle_fileno_method},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method},
    {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_udp_new);
  lua_setfield(L, -2, "udp_new");
}
