/* TCP and unix-pipe streams: core.tcp_new() -> cluster.tcp, core.pipe_new() -> cluster.pipe.
 * Both share the stream methods (listen, accept, read, write, shutdown); bind, connect
 * and the address methods differ by kind. Mechanism only: buffering for backpressure,
 * events and graceful close are decided in lua/cluster/net.lua.
 *
 * Host names: connect() resolves any host with uv_getaddrinfo (preferring an IPv4
 * result, as Node's dns.lookup did before v17); bind() takes numeric addresses and
 * "localhost" (127.0.0.1) only, so that binding never waits on the resolver. */
#include "stream.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/socket.h>
#include <unistd.h>

#define TCP_TNAME "cluster.tcp"
#define PIPE_TNAME "cluster.pipe"

/* Callback slots of a stream's cl_handle. */
enum { SLOT_CONNECTION = 0, SLOT_READ = 1 };

/* A request in flight: libuv's req first, then what the callback needs. */
typedef struct {
  union {
    uv_req_t req;
    uv_write_t write;
    uv_connect_t connect;
    uv_shutdown_t shutdown;
    uv_getaddrinfo_t gai;
  } u;
  lua_State *L;
  int cb_ref;     /* the Lua callback, LUA_NOREF if none */
  int data_ref;   /* the string being written, kept alive while libuv reads it */
  int handle_ref; /* the stream userdata, while a name is being resolved */
  int port;
  uv_buf_t buf;
  char *owned;    /* a copy being written, freed with the request (held bytes) */
  char detail[300]; /* "host:port" or the path, for error messages */
} stream_req;

/* A request with no references yet; NULL when out of memory. */
static stream_req *req_alloc(lua_State *L) {
  stream_req *r = calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  r->L = L;
  r->cb_ref = r->data_ref = r->handle_ref = LUA_NOREF;
  return r;
}

static stream_req *req_new(lua_State *L) {
  stream_req *r = req_alloc(L);
  if (r == NULL) luaL_error(L, "out of memory");
  return r;
}

static void req_free(stream_req *r) {
  luaL_unref(r->L, LUA_REGISTRYINDEX, r->cb_ref);
  luaL_unref(r->L, LUA_REGISTRYINDEX, r->data_ref);
  luaL_unref(r->L, LUA_REGISTRYINDEX, r->handle_ref);
  free(r->owned);
  free(r);
}

/* Calls the request's callback with nil or an error object, then frees the request.
 * `with_address`: add address/port (TCP) or path (pipe) fields from r->detail. */
static void req_finish(stream_req *r, int status, const char *syscall, int kind) {
  lua_State *L = r->L;
  if (r->cb_ref == LUA_NOREF) {
    req_free(r);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->cb_ref);
  if (status == 0) {
    lua_pushnil(L);
  } else {
    cl_push_error_object(L, status, syscall, r->detail);
    if (kind == UV_TCP && r->port >= 0) {
      /* detail is "host:port"; the host is everything before the last colon */
      const char *colon = strrchr(r->detail, ':');
      if (colon) {
        lua_pushlstring(L, r->detail, (size_t)(colon - r->detail));
        lua_setfield(L, -2, "address");
        lua_pushinteger(L, r->port);
        lua_setfield(L, -2, "port");
      }
    } else if (kind == UV_NAMED_PIPE && r->detail[0]) {
      lua_pushstring(L, r->detail);
      lua_setfield(L, -2, "path");
    }
  }
  req_free(r);
  cl_call(L, 1);
}

/* ---- helpers shared with udp.c ---- */

int cl_parse_addr(const char *host, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0) return 0;
  if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0) return 0;
  return UV_EINVAL;
}

/* Dotted quad without printf: libuv's uv_ip4_name goes through snprintf, which
 * costs more than the rest of accepting a connection's bookkeeping. */
static size_t format_ip4(char *out, const struct sockaddr_in *in) {
  const unsigned char *a = (const unsigned char *)&in->sin_addr;
  char *p = out;
  for (int i = 0; i < 4; i++) {
    unsigned v = a[i];
    if (v >= 100) { *p++ = (char)('0' + v / 100); v %= 100; *p++ = (char)('0' + v / 10); v %= 10; }
    else if (v >= 10) { *p++ = (char)('0' + v / 10); v %= 10; }
    *p++ = (char)('0' + v);
    if (i < 3) *p++ = '.';
  }
  return (size_t)(p - out);
}

void cl_push_sockaddr_values(lua_State *L, const struct sockaddr *sa) {
  char ip[INET6_ADDRSTRLEN + 16];
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    lua_pushlstring(L, ip, format_ip4(ip, in));
    lua_pushinteger(L, ntohs(in->sin_port));
    lua_pushliteral(L, "IPv4");
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    uv_ip6_name(in6, ip, sizeof ip);
    lua_pushstring(L, ip);
    lua_pushinteger(L, ntohs(in6->sin6_port));
    lua_pushliteral(L, "IPv6");
  } else {
    lua_pushnil(L); lua_pushnil(L); lua_pushnil(L);
  }
}

void cl_push_sockaddr(lua_State *L, const struct sockaddr *sa) {
  char ip[INET6_ADDRSTRLEN + 16] = "";
  int port = 0;
  const char *family = "unknown";
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    uv_ip4_name(in, ip, sizeof ip);
    port = ntohs(in->sin_port);
    family = "IPv4";
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    uv_ip6_name(in6, ip, sizeof ip);
    port = ntohs(in6->sin6_port);
    family = "IPv6";
  }
  lua_createtable(L, 0, 3);
  lua_pushstring(L, ip);
  lua_setfield(L, -2, "address");
  lua_pushinteger(L, port);
  lua_setfield(L, -2, "port");
  lua_pushstring(L, family);
  lua_setfield(L, -2, "family");
}

/* ---- creation ---- */

static void stream_free(cl_handle *h);
static void stream_flush(cl_handle *h, int closing);
static void read_soon_cancel(cl_handle *h);

uv_handle_t *cl_stream_new(lua_State *L, uv_handle_type type) {
  cl_handle *h;
  switch (type) {
  case UV_TCP:
    h = cl_handle_new(L, sizeof(cl_handle), TCP_TNAME);
    uv_tcp_init(cl_loop(), &h->u.tcp); /* AF_UNSPEC: creates no socket, cannot fail */
    h->on_free = stream_free;
    h->flush = stream_flush;
    return &h->u.handle;
  case UV_NAMED_PIPE:
    h = cl_handle_new(L, sizeof(cl_handle), PIPE_TNAME);
    uv_pipe_init(cl_loop(), &h->u.pipe, 0);
    h->on_free = stream_free;
    return &h->u.handle;
  case UV_UDP:
    return cl_udp_new(L, AF_UNSPEC); /* AF_UNSPEC cannot fail either */
  default:
    lua_pushnil(L);
    return NULL;
  }
}

/* core.ip_family(s) -> 4 | 6 | 0: whether s is an IPv4 or an IPv6 address in text
 * (net.isIP); a zone ("fe80::1%lo") counts, as for Node. */
static int l_ip_family(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  struct sockaddr_storage ss;
  int family = 0;
  if (strlen(s) == len) { /* (an embedded NUL is no address) */
    if (uv_ip4_addr(s, 0, (struct sockaddr_in *)&ss) == 0) family = 4;
    else if (uv_ip6_addr(s, 0, (struct sockaddr_in6 *)&ss) == 0) family = 6;
  }
  lua_pushinteger(L, family);
  return 1;
}

static int l_tcp_new(lua_State *L) {
  cl_stream_new(L, UV_TCP);
  return 1;
}

static int l_pipe_new(lua_State *L) {
  cl_stream_new(L, UV_NAMED_PIPE);
  return 1;
}

/* ---- argument checks ---- */

/* In the cluster.tcp and cluster.pipe metatables: every stream method checks it. */
static const char STREAM_MARK = 0;

static cl_handle *check_stream(lua_State *L, int idx) {
  return cl_check_marked(L, idx, &STREAM_MARK, "cluster.tcp or cluster.pipe");
}

static int is_tcp(cl_handle *h) { return h->u.handle.type == UV_TCP; }

static int check_port(lua_State *L, int idx) {
  lua_Integer port = luaL_checkinteger(L, idx);
  luaL_argcheck(L, port >= 0 && port <= 65535, idx, "port must be in 0..65535");
  return (int)port;
}

static int opt_flag(lua_State *L, int idx, const char *field) {
  if (lua_isnoneornil(L, idx)) return 0;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_getfield(L, idx, field);
  int on = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return on;
}

/* ---- bind / listen / accept ---- */

/* tcp:bind(host, port[, {ipv6Only=}]) / pipe:bind(path) -> true | nil, msg, code */
static int s_bind(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  int err;
  if (is_tcp(h)) {
    const char *host = luaL_checkstring(L, 2);
    int port = check_port(L, 3);
    unsigned flags = opt_flag(L, 4, "ipv6Only") ? UV_TCP_IPV6ONLY : 0;
    struct sockaddr_storage ss;
    err = cl_parse_addr(host, port, &ss);
    if (err == 0) err = uv_tcp_bind(&h->u.tcp, (struct sockaddr *)&ss, flags);
  } else {
    err = uv_pipe_bind(&h->u.pipe, luaL_checkstring(L, 2));
  }
  if (err) return cl_push_fail(L, err, "bind");
  lua_pushboolean(L, 1);
  return 1;
}

/* A connection the Lua callback did not accept (it raised first) is closed: libuv would
 * stop accepting until it was, and nothing takes it later. */
static void on_connection(uv_stream_t *server, int status) {
  cl_handle *h = server->data;
  if (cl_push_cb(h, SLOT_CONNECTION)) {
    if (status < 0) cl_push_error_object(h->L, status, "accept", NULL);
    else lua_pushnil(h->L);
    cl_call(h->L, 1);
  }
  if (status == 0 && server->accepted_fd != -1 && !uv_is_closing((uv_handle_t *)server)) {
    close(server->accepted_fd);
    server->accepted_fd = -1;
  }
}

/* s:listen(backlog, on_connection(err)) -> true | nil, msg, code.
 * A bind error that libuv delays (EADDRINUSE) is reported here. */
static int s_listen(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  lua_Integer backlog = luaL_checkinteger(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  luaL_argcheck(L, backlog >= 0 && backlog <= 0x7fffffff, 2, "backlog out of range");
  int err = uv_listen(&h->u.stream, (int)backlog, on_connection);
  if (err) return cl_push_fail(L, err, "listen");
  if (is_tcp(h)) cl_accept_with_peer(&h->u.tcp);
  cl_set_cb(L, h, SLOT_CONNECTION, 3);
  lua_pushboolean(L, 1);
  return 1;
}

/* Pushes a connected TCP stream's remote address, port and family, then its local ones
 * (nils where unknown): both ends at once, without tables, for every accepted
 * connection. The remote end, when the accept brought it (`peer`), and a local end the
 * caller knows (its server's own address, at local_idx, local_idx + 1, local_idx + 2)
 * are pushed as given instead of asking the kernel. */
static int push_addresses(lua_State *L, uv_tcp_t *tcp, const struct sockaddr *peer, int local_idx) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  if (peer) cl_push_sockaddr_values(L, peer);
  else if (uv_tcp_getpeername(tcp, (struct sockaddr *)&ss, &len) == 0) cl_push_sockaddr_values(L, (struct sockaddr *)&ss);
  else { lua_pushnil(L); lua_pushnil(L); lua_pushnil(L); }
  if (!lua_isnoneornil(L, local_idx)) {
    lua_pushvalue(L, local_idx);
    lua_pushvalue(L, local_idx + 1);
    lua_pushvalue(L, local_idx + 2);
    return 6;
  }
  len = sizeof ss;
  if (uv_tcp_getsockname(tcp, (struct sockaddr *)&ss, &len) == 0) cl_push_sockaddr_values(L, (struct sockaddr *)&ss);
  else { lua_pushnil(L); lua_pushnil(L); lua_pushnil(L); }
  return 6;
}

/* s:accept([localAddress, localPort, localFamily]) -> stream of the same kind | nil, msg,
 * code. A TCP stream comes with its addresses, as tcp:addresses() returns them (the
 * arguments are its server's own address, when the caller knows it). */
static int s_accept(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  uv_handle_t *client = cl_stream_new(L, h->u.handle.type);
  const struct sockaddr *peer = is_tcp(h) ? cl_accepted_peer(&h->u.tcp) : NULL;
  int err = uv_accept(&h->u.stream, (uv_stream_t *)client);
  if (err) {
    cl_handle_close(client->data);
    lua_pop(L, 1);
    return cl_push_fail(L, err, "accept");
  }
  ((cl_handle *)client->data)->alone = 1; /* accepted here: nobody else has it yet */
  if (!is_tcp(h)) return 1;
  return 1 + push_addresses(L, (uv_tcp_t *)client, peer, 2);
}

/* ---- connect ---- */

static void on_connect(uv_connect_t *c, int status) {
  stream_req *r = (stream_req *)c;
  req_finish(r, status, "connect", c->handle->type);
}

/* Picks the first IPv4 result, else the first one. */
static const struct sockaddr *pick_addr(const struct addrinfo *res) {
  for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
    if (ai->ai_family == AF_INET) return ai->ai_addr;
  for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
    if (ai->ai_family == AF_INET6) return ai->ai_addr;
  return NULL;
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  stream_req *r = (stream_req *)gai;
  lua_State *L = r->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->handle_ref);
  cl_handle *h = *(cl_handle **)lua_touserdata(L, -1);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, r->handle_ref);
  r->handle_ref = LUA_NOREF;
  const char *syscall = "getaddrinfo";
  if (status == 0 && (h == NULL || cl_handle_is_closing(h))) status = UV_ECANCELED;
  if (status == 0) {
    const struct sockaddr *sa = pick_addr(res);
    if (sa == NULL) {
      status = UV_EAI_ADDRFAMILY;
    } else {
      struct sockaddr_storage ss;
      memcpy(&ss, sa, sa->sa_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6));
      ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)r->port); /* same offset in in6 */
      /* The getaddrinfo request is over; a fresh one for the connect keeps the unions apart. */
      stream_req *c = req_new(L);
      c->cb_ref = r->cb_ref;
      c->port = r->port;
      /* errors name the address tried, as Node's do ("127.1" -> 127.0.0.1:port) */
      char ip[INET6_ADDRSTRLEN];
      if (uv_ip_name(sa, ip, sizeof ip) == 0)
        snprintf(c->detail, sizeof c->detail, "%s:%d", ip, r->port);
      else
        memcpy(c->detail, r->detail, sizeof c->detail);
      r->cb_ref = LUA_NOREF;
      status = uv_tcp_connect(&c->u.connect, &h->u.tcp, (struct sockaddr *)&ss, on_connect);
      if (status == 0) {
        uv_freeaddrinfo(res);
        req_free(r);
        return;
      }
      r->cb_ref = c->cb_ref;
      c->cb_ref = LUA_NOREF;
      req_free(c);
      syscall = "connect";
    }
  }
  uv_freeaddrinfo(res);
  req_finish(r, status, syscall, UV_TCP);
}

/* tcp:connect(host, port, cb(err)) / pipe:connect(path, cb(err)) -> true | nil, msg, code */
static int s_connect(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  int err = 0;
  if (is_tcp(h)) {
    const char *host = luaL_checkstring(L, 2);
    int port = check_port(L, 3);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    stream_req *r = req_new(L);
    lua_pushvalue(L, 4);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    r->port = port;
    snprintf(r->detail, sizeof r->detail, "%s:%d", host, port);
    struct sockaddr_storage ss;
    if (cl_parse_addr(host, port, &ss) == 0) {
      err = uv_tcp_connect(&r->u.connect, &h->u.tcp, (struct sockaddr *)&ss, on_connect);
    } else {
      struct addrinfo hints;
      memset(&hints, 0, sizeof hints);
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      lua_pushvalue(L, 1);
      r->handle_ref = luaL_ref(L, LUA_REGISTRYINDEX);
      err = uv_getaddrinfo(cl_loop(), &r->u.gai, on_resolved, host, NULL, &hints);
    }
    if (err) req_free(r);
  } else {
    const char *path = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    stream_req *r = req_new(L);
    lua_pushvalue(L, 3);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    r->port = -1;
    snprintf(r->detail, sizeof r->detail, "%s", path);
    uv_pipe_connect(&r->u.connect, &h->u.pipe, path, on_connect); /* errors reach the callback */
  }
  if (err) return cl_push_fail(L, err, "connect");
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- reading ---- */

/* Reads are consumed (copied into a Lua string) inside the read callback, and libuv
 * never interleaves two allocations before their reads, so one buffer serves all. */
static char read_buffer[64 * 1024];

/* Before a handed unix connection's first read: its owner becomes this process (see
 * channel.c, handle_conn_frame). */
static void mark_before_read(cl_handle *h) {
  uv_os_fd_t fd;
  h->mark_on_read = 0;
  if (uv_fileno(&h->u.handle, &fd) == 0) (void)fcntl(fd, F_SETOWN, (int)getpid());
}

static void on_alloc(uv_handle_t *uvh, size_t suggested, uv_buf_t *buf) {
  cl_handle *h = uvh->data;
  (void)suggested;
  if (h->mark_on_read) mark_before_read(h); /* (libuv reads right after this) */
  if (h->soon_queued) read_soon_cancel(h); /* libuv's poll got there first */
  buf->base = read_buffer;
  buf->len = sizeof read_buffer;
}

/* Calls the read callback with a chunk (nread > 0), the end (UV_EOF) or an error of
 * `syscall` (a failed read, or a failed send of held bytes). */
static void call_read_cb(cl_handle *h, ssize_t nread, const uv_buf_t *buf, const char *syscall) {
  lua_State *L = h->L;
  if (!cl_push_cb(h, SLOT_READ)) return;
  int nargs = 2;
  if (h->read_with_owner) {
    cl_push_owner_ref(L, h->self_ref);
    nargs = 3;
  }
  if (nread > 0) {
    lua_pushnil(L);
    lua_pushlstring(L, buf->base, (size_t)nread);
  } else if (nread == UV_EOF) {
    lua_pushnil(L);
    lua_pushnil(L);
  } else {
    cl_push_error_object(L, (int)nread, syscall, NULL);
    lua_pushnil(L);
  }
  cl_call(L, nargs);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  if (nread == 0) return; /* EAGAIN: nothing to report */
  call_read_cb(stream->data, nread, buf, "read");
}

/* s:read_start(cb(err, chunk)) or s:read_start(cb(owner, err, chunk), owner); chunk
 * nil (with err nil) means end of stream. The owner (the Socket) spares the Lua side
 * a closure per connection. */
static int s_read_start(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  h->read_with_owner = !lua_isnoneornil(L, 3);
  if (h->read_with_owner) cl_set_owner(L, 1, 3);
  cl_set_cb(L, h, SLOT_READ, 2);
  int err = uv_read_start(&h->u.stream, on_alloc, on_read);
  if (err && err != UV_EALREADY) return cl_push_fail(L, err, "read");
  lua_pushboolean(L, 1);
  return 1;
}

/* recv(2) and send(2) rather than read(2) and write(2), on the paths that are ours: on
 * a socket they skip the VFS layer (its file position lock, the iterators), as nginx's
 * calls do. A stream handle is always a socket; read and write stay for anything else. */
static ssize_t sock_recv(int fd, char *p, size_t n) {
  ssize_t r;
  do r = recv(fd, p, n, 0); while (r < 0 && errno == EINTR);
  if (r < 0 && errno == ENOTSOCK) do r = read(fd, p, n); while (r < 0 && errno == EINTR);
  return r;
}

/* uv_try_write's one buffer with send(2): the bytes written, UV_EAGAIN (not now: the
 * stream is connecting or has writes queued, or the socket is full) or an error. */
static int try_send(uv_stream_t *s, const char *p, size_t n, int flags) {
  uv_os_fd_t fd;
  if (s->connect_req != NULL || uv_stream_get_write_queue_size(s) != 0) return UV_EAGAIN;
  if (uv_fileno((uv_handle_t *)s, &fd) != 0) {
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    return uv_try_write(s, &b, 1); /* (libuv's own error for a stream without one) */
  }
  if (n > INT_MAX) n = INT_MAX;
  ssize_t r;
  do r = send(fd, p, n, MSG_NOSIGNAL | flags); while (r < 0 && errno == EINTR);
  if (r < 0 && errno == ENOTSOCK) do r = write(fd, p, n); while (r < 0 && errno == EINTR);
  if (r >= 0) return (int)r;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return UV_EAGAIN;
  return uv_translate_sys_error(errno);
}

/* ---- a turn's writes, sent together ----
 * A small write to a TCP stream (no callback, nothing queued before it) is not sent at
 * once: its bytes are copied and sent at the end of the loop turn, together with the
 * stream's other small writes of the turn: one send(2) for a response written in
 * pieces, as Node's http corks a response until the next tick. The end of the turn is
 * the check phase (after the I/O callbacks), or the prepare phase for writes made
 * since (timers, deferred calls), so bytes are never held while the loop waits.
 * When the stream closes first, its bytes go with MSG_MORE just before the close: the
 * kernel then sends the FIN in the same segment as the last bytes. A connection
 * answered and closed in one turn costs 8 TCP segments on loopback instead of 10: the
 * answer and the end travel together, and the peer acknowledges once.
 * Whatever must come after the bytes sends them first: a write that is not held (with
 * a callback, or too large), shutdown, fileno(), sending the handle over a channel,
 * the end of a run of the loop, and the process's exit.
 * A send that fails at the end of the turn reaches the stream's read callback as a
 * "write" error (a Socket destroys itself with it, as when a write fails at once); one
 * that fails at the close, the close callback, after the owner. What the socket cannot
 * take at the end of the turn waits in libuv's write queue, as any write's rest does;
 * at a close (destroy) it is dropped, as libuv drops its queue then. */
enum {
  HOLD_MAX = 16 * 1024, /* bytes a stream holds at most (Node's highWaterMark) */
  HOLD_KEEP = 1024      /* a buffer kept for the stream's next turns is no larger */
};
static cl_handle *held_head;   /* the streams holding bytes (held_prev, held_next) */
static uv_prepare_t held_prepare;
static int held_exit_registered;
static void on_write(uv_write_t *w, int status);
static void end_of_turn_start(void);

static void held_unlink(cl_handle *h) {
  if (h->held_prev) h->held_prev->held_next = h->held_next;
  else if (held_head == h) held_head = h->held_next;
  if (h->held_next) h->held_next->held_prev = h->held_prev;
  h->held_prev = h->held_next = NULL;
}

/* Whether a write of n bytes to h may be held: see above. */
static int can_hold(cl_handle *h, size_t n) {
  uv_stream_t *s = &h->u.stream;
  if (h->held_len > 0) return h->held_len + n <= HOLD_MAX;
  uv_os_fd_t fd;
  return n <= HOLD_MAX && is_tcp(h) && s->connect_req == NULL && uv_stream_get_write_queue_size(s) == 0 &&
         uv_is_writable(s) && !uv_is_closing(&h->u.handle) && uv_fileno(&h->u.handle, &fd) == 0;
}

/* Adds n bytes to what h holds; 0 when out of memory (nothing held then). */
static int hold(cl_handle *h, const char *p, size_t n) {
  size_t need = h->held_len + n;
  if (need > h->held_cap) {
    size_t cap = h->held_cap ? h->held_cap * 2 : 256;
    while (cap < need) cap *= 2;
    char *q = realloc(h->held, cap);
    if (q == NULL) return 0;
    h->held = q;
    h->held_cap = cap;
  }
  memcpy(h->held + h->held_len, p, n);
  if (h->held_len == 0) {
    h->held_next = held_head;
    if (held_head) held_head->held_prev = h;
    h->held_prev = NULL;
    held_head = h;
    end_of_turn_start();
  }
  h->held_len = need;
  return 1;
}

/* Sends what h holds (send flags `flags`); returns 0 or the send's error. The rest the
 * socket cannot take now goes to libuv's write queue, unless `closing` (then dropped). */
static int held_send(cl_handle *h, int flags, int closing) {
  char *p = h->held;
  size_t n = h->held_len;
  h->held_len = 0;
  held_unlink(h);
  if (n == 0) return 0;
  int sent = try_send(&h->u.stream, p, n, flags);
  if (sent < 0) sent = sent == UV_EAGAIN ? 0 : sent;
  if (sent < 0 || (size_t)sent == n || closing) {
    /* a small buffer stays for the stream's next turns (stream_free frees it); a large
     * one would stay with every connection that once wrote that much */
    if (h->held_cap > HOLD_KEEP) {
      free(p);
      h->held = NULL;
      h->held_cap = 0;
    }
    return sent < 0 ? sent : 0;
  }
  /* the rest goes to libuv's queue with the buffer, which the request then owns */
  h->held = NULL;
  h->held_cap = 0;
  stream_req *r = req_alloc(h->L);
  if (r == NULL) {
    free(p);
    return UV_ENOMEM;
  }
  r->port = -1;
  r->owned = p;
  r->buf = uv_buf_init(p + sent, (unsigned)(n - (size_t)sent));
  int err = uv_write(&r->u.write, &h->u.stream, &r->buf, 1, on_write);
  if (err) req_free(r);
  return err;
}

/* A send at the end of the turn failed: the read callback hears it, as a read error. */
static void report_write_error(cl_handle *h, int err) {
  if (!uv_is_closing(&h->u.handle)) call_read_cb(h, err, NULL, "write");
}

/* The end of the turn: every stream's held bytes are sent (a callback that hears of a
 * failure may write again: those are sent too). */
void cl_stream_flush_all(void) {
  while (held_head) {
    cl_handle *h = held_head;
    int err = held_send(h, 0, 0);
    if (err) report_write_error(h, err);
  }
}

/* the stream's flush hook (cl_handle_flush, cl_handle_close): at a close, the bytes go
 * with MSG_MORE, so that the FIN the close sends rides in their segment */
static void stream_flush(cl_handle *h, int closing) {
  if (h->held_len == 0) return;
  int err = held_send(h, closing ? MSG_MORE : 0, closing);
  if (err && closing) h->close_error = err;
  else if (err) report_write_error(h, err);
}

static void on_held_prepare(uv_prepare_t *p) {
  cl_stream_flush_all();
  uv_prepare_stop(p);
}

/* at exit, what is still held is sent as it is (no callback runs any more) */
static void flush_held_at_exit(void) {
  while (held_head) {
    cl_handle *h = held_head;
    (void)held_send(h, 0, 1);
  }
}

/* ---- a new connection's first read ----
 * s:read_soon(): one read(2) at the end of this turn's I/O callbacks (a check handle),
 * for a reading stream whose first bytes are likely on their way: a connection just
 * accepted, whose request usually arrives while the turn handles the others that were
 * ready with it (a round-robin hand-off's came with it). What the read finds goes to
 * the read callback as libuv's reads do, and a connection answered and closed then is
 * never registered with epoll: its ADD, the poll's wake-up for it and its DEL are
 * spared. If nothing is there yet, libuv's own reading (the stream is registered as the
 * next poll begins) takes over.
 * For connections that stay silent (a protocol where the server speaks first) the read
 * is a system call for nothing, so the process keeps a score: up by one for a read that
 * found bytes (to SOON_MAX), down by one for one that found none; when it would go
 * below zero, the next SOON_SKIP connections are left to the poll, then reads resume. */
enum { SOON_MAX = 8, SOON_SKIP = 16 };
static int soon_score;
static cl_handle *soon_head, *soon_tail; /* the queue, through cl_handle.soon_next */
static uv_check_t soon_check;
static int soon_check_ready;

/* Takes a stream off the queue (read_stop, libuv's own read, or its handle is being
 * freed: stream_free). */
static void read_soon_cancel(cl_handle *h) {
  cl_handle **p = &soon_head, *prev = NULL;
  while (*p && *p != h) { prev = *p; p = &(*p)->soon_next; }
  if (*p) {
    *p = h->soon_next;
    if (soon_tail == h) soon_tail = prev;
  }
  h->soon_next = NULL;
  h->soon_queued = 0;
}

static void stream_free(cl_handle *h) {
  if (h->soon_queued) read_soon_cancel(h);
  if (h->held_len > 0) held_unlink(h); /* (sent at the close, unless that failed) */
  free(h->held);
}

static void read_now(cl_handle *h) {
  uv_os_fd_t fd;
  if (uv_fileno(&h->u.handle, &fd) != 0) return;
  uv_buf_t buf;
  on_alloc(&h->u.handle, sizeof read_buffer, &buf);
  ssize_t n = sock_recv(fd, buf.base, buf.len);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
    soon_score = soon_score == 0 ? -SOON_SKIP : soon_score - 1;
    return;
  }
  if (soon_score < SOON_MAX) soon_score++;
  if (n > 0) {
    on_read(&h->u.stream, n, &buf);
    return;
  }
  /* the end, or an error: reading stops, as libuv's does */
  int status = n == 0 ? UV_EOF : uv_translate_sys_error(errno);
  uv_read_stop(&h->u.stream);
  on_read(&h->u.stream, status, &buf);
}

/* The check phase: the first reads, then the turn's held writes (the callbacks of
 * either may queue more of both: they are done too). */
static void on_soon(uv_check_t *c) {
  do {
    while (soon_head) {
      cl_handle *h = soon_head;
      soon_head = h->soon_next;
      if (soon_head == NULL) soon_tail = NULL;
      h->soon_next = NULL;
      h->soon_queued = 0;
      if (!uv_is_closing(&h->u.handle)) read_now(h);
    }
    cl_stream_flush_all();
  } while (soon_head);
  uv_check_stop(c);
}

/* The check and prepare handles of the turn's end, made once; unreferenced, they keep
 * no loop alive. */
static void turn_handles_init(void) {
  if (soon_check_ready) return;
  uv_check_init(cl_loop(), &soon_check);
  uv_unref((uv_handle_t *)&soon_check);
  uv_prepare_init(cl_loop(), &held_prepare);
  uv_unref((uv_handle_t *)&held_prepare);
  soon_check_ready = 1;
}

static void end_of_turn_start(void) {
  turn_handles_init();
  uv_check_start(&soon_check, on_soon);
  uv_prepare_start(&held_prepare, on_held_prepare);
  if (!held_exit_registered && atexit(flush_held_at_exit) == 0) held_exit_registered = 1;
}

static int s_read_soon(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  if (h->soon_queued || !uv_is_active(&h->u.handle)) return 0;
  if (soon_score < 0) { /* backing off: the poll reads it */
    soon_score++;
    return 0;
  }
  turn_handles_init();
  h->soon_queued = 1;
  h->soon_next = NULL;
  if (soon_tail) soon_tail->soon_next = h;
  else soon_head = h;
  soon_tail = h;
  uv_check_start(&soon_check, on_soon);
  return 0;
}

static int s_read_stop(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  if (h->soon_queued) read_soon_cancel(h);
  uv_read_stop(&h->u.stream);
  return 0;
}

/* ---- writing ---- */

static void on_write(uv_write_t *w, int status) {
  req_finish((stream_req *)w, status, "write", -1);
}

/* s:write(data[, cb(err)]) -> bytes still queued | false | nil, msg, code.
 * Tries a direct write first and queues only the remainder. The callback, when
 * given, always runs later from the loop, after the data has been handed to the
 * kernel (a fully written chunk queues an empty write to keep that order). Data that
 * is not a string (a number neither) gives false and writes nothing: net's socket
 * writes without checking first, and raises its own error then. */
static int s_write(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  if (lua_type(L, 2) != LUA_TSTRING) {
    lua_pushboolean(L, 0);
    return 1;
  }
  size_t len;
  const char *data = lua_tolstring(L, 2, &len);
  luaL_argcheck(L, len <= UINT32_MAX, 2, "data larger than 4 GiB");
  int has_cb = !lua_isnoneornil(L, 3);
  if (has_cb) luaL_checktype(L, 3, LUA_TFUNCTION);
  if (len > 0 && !has_cb && can_hold(h, len) && hold(h, data, len)) {
    lua_pushinteger(L, (lua_Integer)uv_stream_get_write_queue_size(&h->u.stream));
    return 1;
  }
  if (h->held_len > 0) { /* (what it holds goes first) */
    int err = held_send(h, 0, 0);
    if (err) return cl_push_fail(L, err, "write");
  }
  size_t done = 0;
  if (len > 0) {
    int n = try_send(&h->u.stream, data, len, 0);
    if (n >= 0) done = (size_t)n;
    else if (n != UV_EAGAIN && n != UV_ENOSYS) return cl_push_fail(L, n, "write");
  }
  if (done < len || has_cb) {
    stream_req *r = req_new(L);
    r->port = -1;
    r->buf = uv_buf_init((char *)data + done, (unsigned)(len - done));
    if (done < len) {
      lua_pushvalue(L, 2);
      r->data_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (has_cb) {
      lua_pushvalue(L, 3);
      r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    int err = uv_write(&r->u.write, &h->u.stream, &r->buf, 1, on_write);
    if (err) {
      req_free(r);
      return cl_push_fail(L, err, "write");
    }
  }
  lua_pushinteger(L, (lua_Integer)uv_stream_get_write_queue_size(&h->u.stream));
  return 1;
}

/* s:close_when_sent(cb, owner) -> boolean: closes the stream now, as close(cb, owner)
 * does, unless some of what was written still waits in libuv's write queue (then
 * false, and nothing is closed). The bytes it holds go first, with MSG_MORE: the FIN
 * of the close rides in their segment (a Socket's destroySoon). */
static int s_close_when_sent(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (h->held_len > 0) {
    int err = held_send(h, is_tcp(h) ? MSG_MORE : 0, 0);
    if (err) h->close_error = err; /* (the close callback hears it) */
  }
  if (!h->close_error && uv_stream_get_write_queue_size(&h->u.stream) > 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_settop(L, 3);
  cl_handle_close_method(L);
  lua_pushboolean(L, 1);
  return 1;
}

static int s_write_queue_size(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  lua_pushinteger(L, (lua_Integer)uv_stream_get_write_queue_size(&h->u.stream));
  return 1;
}

static void on_shutdown(uv_shutdown_t *s, int status) {
  req_finish((stream_req *)s, status, "shutdown", -1);
}

/* s:shutdown([cb(err)]) -> true | nil, msg, code: ends the writing side once the
 * queued writes are done. */
static int s_shutdown(lua_State *L) {
  cl_handle *h = check_stream(L, 1);
  if (h->held_len > 0) {
    int err = held_send(h, 0, 0);
    if (err) return cl_push_fail(L, err, "write");
  }
  stream_req *r = req_new(L);
  r->port = -1;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  int err = uv_shutdown(&r->u.shutdown, &h->u.stream, on_shutdown);
  if (err) {
    req_free(r);
    return cl_push_fail(L, err, "shutdown");
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- addresses and options ---- */

static int push_name(lua_State *L, cl_handle *h, int peer) {
  const char *what = peer ? "getpeername" : "getsockname";
  int err;
  if (is_tcp(h)) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    err = peer ? uv_tcp_getpeername(&h->u.tcp, (struct sockaddr *)&ss, &len)
               : uv_tcp_getsockname(&h->u.tcp, (struct sockaddr *)&ss, &len);
    if (err) return cl_push_fail(L, err, what);
    cl_push_sockaddr(L, (struct sockaddr *)&ss);
    return 1;
  }
  char path[4096];
  size_t len = sizeof path;
  err = peer ? uv_pipe_getpeername(&h->u.pipe, path, &len)
             : uv_pipe_getsockname(&h->u.pipe, path, &len);
  if (err) return cl_push_fail(L, err, what);
  lua_pushlstring(L, path, len);
  return 1;
}

/* tcp:addresses([localAddress, localPort, localFamily]) -> remoteAddress, remotePort,
 * remoteFamily, localAddress, localPort, localFamily (see push_addresses). */
static int s_addresses(lua_State *L) {
  return push_addresses(L, &cl_handle_check(L, 1, TCP_TNAME)->u.tcp, NULL, 2);
}

/* s:getsockname() / s:getpeername() -> {address=, port=, family=} (tcp) or path (pipe) */
static int s_getsockname(lua_State *L) { return push_name(L, check_stream(L, 1), 0); }
static int s_getpeername(lua_State *L) { return push_name(L, check_stream(L, 1), 1); }

static cl_handle *check_tcp(lua_State *L, int idx) { return cl_handle_check(L, idx, TCP_TNAME); }

/* tcp:nodelay(on) -> true | nil, msg, code */
static int s_nodelay(lua_State *L) {
  cl_handle *h = check_tcp(L, 1);
  int err = uv_tcp_nodelay(&h->u.tcp, lua_toboolean(L, 2));
  if (err) return cl_push_fail(L, err, "nodelay");
  lua_pushboolean(L, 1);
  return 1;
}

/* tcp:keepalive(on[, delay_seconds]) -> true | nil, msg, code */
static int s_keepalive(lua_State *L) {
  cl_handle *h = check_tcp(L, 1);
  int on = lua_toboolean(L, 2);
  lua_Integer delay = luaL_optinteger(L, 3, 1);
  luaL_argcheck(L, !on || (delay >= 1 && delay <= 0x7fffffff), 3, "delay must be >= 1 second");
  int err = uv_tcp_keepalive(&h->u.tcp, on, (unsigned)delay);
  if (err) return cl_push_fail(L, err, "keepalive");
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- errors for the Lua layer ---- */

static int errno_from_name(const char *name) {
#define XX(code, _) if (strcmp(name, #code) == 0) return UV_##code;
  UV_ERRNO_MAP(XX)
#undef XX
  return 0;
}

/* core.error_object(code, syscall[, detail]) -> the contract's error object.
 * code is a libuv error name ("EADDRINUSE", as cl_push_fail returns) or number.
 * Lets Lua turn luv's triple into an error object for an 'error' event. */
static int l_error_object(lua_State *L) {
  int err;
  if (lua_type(L, 1) == LUA_TNUMBER) {
    err = (int)luaL_checkinteger(L, 1);
  } else {
    err = errno_from_name(luaL_checkstring(L, 1));
    luaL_argcheck(L, err != 0, 1, "unknown error name");
  }
  luaL_argcheck(L, err < 0, 1, "not an error code");
  const char *syscall = luaL_checkstring(L, 2);
  cl_push_error_object(L, err, syscall, luaL_optstring(L, 3, NULL));
  return 1;
}

void cl_open_stream(lua_State *L) {
  /* A write to a socket or pipe whose peer is gone must fail with EPIPE, not kill the
   * process (Node does the same at startup). Only the default action is replaced; libuv
   * resets dispositions in the children it spawns. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  static const luaL_Reg methods[] = {
    {"bind", s_bind}, {"listen", s_listen}, {"accept", s_accept}, {"connect", s_connect},
    {"read_start", s_read_start}, {"read_stop", s_read_stop}, {"read_soon", s_read_soon},
    {"write", s_write},
    {"write_queue_size", s_write_queue_size}, {"close_when_sent", s_close_when_sent},
    {"shutdown", s_shutdown},
    {"getsockname", s_getsockname}, {"getpeername", s_getpeername},
    {"close", cl_handle_close_method}, {"fileno", cl_handle_fileno_method},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method},
    {NULL, NULL}};
  static const luaL_Reg tcp_methods[] = {
    {"nodelay", s_nodelay}, {"keepalive", s_keepalive}, {"addresses", s_addresses}, {NULL, NULL}};
  /* The tcp metatable gets the stream methods plus its own. */
  cl_handle_register(L, TCP_TNAME, methods);
  luaL_getmetatable(L, TCP_TNAME);
  lua_getfield(L, -1, "__index");
  luaL_setfuncs(L, tcp_methods, 0);
  lua_pop(L, 2);
  cl_handle_register(L, PIPE_TNAME, methods);
  cl_set_mark(L, TCP_TNAME, &STREAM_MARK);
  cl_set_mark(L, PIPE_TNAME, &STREAM_MARK);
  /* core.stream_methods: the tcp methods table, for Lua code that calls them as plain
   * functions (a local, not a metatable lookup per call); the methods both kinds share
   * are the same functions in the pipe's table. */
  luaL_getmetatable(L, TCP_TNAME);
  lua_getfield(L, -1, "__index");
  lua_setfield(L, -3, "stream_methods");
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
    {"tcp_new", l_tcp_new}, {"pipe_new", l_pipe_new}, {"error_object", l_error_object},
    {"ip_family", l_ip_family},
    {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
