/* Round-robin distribution (SCHED_RR) in the master: a listening socket whose accepted
 * connections are handed to workers over their channels, entirely in C.
 *
 * Credit: a member (a worker's server on this key) holds at most `window` connections
 * it has not answered yet; the rest wait in the distributor's queue. The master keeps its
 * copy of every handed connection until the worker answers: accepted -> closed here;
 * refused, or the worker left or died first -> handed to another worker. So connections
 * in flight to a dying worker are not lost. A connection refused by every member in turn
 * is closed. */
#include "channel.h"
#include "stream.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <string.h>

#define TNAME "cluster.rr"

typedef struct rr rr;
typedef struct rr_member rr_member;

typedef struct rr_conn {
  union { uv_handle_t handle; uv_stream_t stream; uv_tcp_t tcp; uv_pipe_t pipe; } u;
  rr *owner;
  rr_member *member;      /* the worker holding it unanswered, or NULL while queued */
  struct rr_conn *next;   /* in the queue or in the member's unanswered list */
  uint32_t seq;
  int writing;            /* the hand-off write has not completed yet */
  int attempts;           /* refusals so far */
  int orphaned;           /* its distributor closed: close once the write completes */
} rr_conn;

struct rr_member {
  rr_member *next;
  cl_handle **channel_box;  /* the channel's userdata slot (kept alive by channel_ref) */
  int channel_ref;
  rr_conn *unanswered;
  int inflight;
  uint32_t next_seq;
  uint64_t handed;          /* connections this worker accepted */
  int leaving;              /* out of the rotation, waiting for its answers */
};

struct rr {
  cl_handle h;              /* the listening socket */
  uint32_t id;
  int window;
  rr_member *members;
  rr_member *cursor;        /* the member that got the last connection */
  int member_count;
  rr_conn *queue_head, *queue_tail;
  uint64_t accepted, dropped;
  rr *next_rr;
};

static rr *all_rr = NULL;   /* live distributors, to route answers by id */
static uint32_t next_rr_id = 1;

static rr *find_rr(uint32_t id) {
  for (rr *r = all_rr; r; r = r->next_rr) if (r->id == id) return r;
  return NULL;
}

static void on_conn_closed(uv_handle_t *h) { free(h->data); }
static void close_conn(rr_conn *c) { uv_close(&c->u.handle, on_conn_closed); }

static cl_channel *member_channel(rr_member *m) {
  cl_handle *h = *m->channel_box;
  if (h == NULL || cl_handle_is_closing(h)) return NULL;
  return (cl_channel *)h;
}

static void enqueue(rr *r, rr_conn *c, int front) {
  c->member = NULL;
  if (front) {
    c->next = r->queue_head;
    r->queue_head = c;
    if (!r->queue_tail) r->queue_tail = c;
  } else {
    c->next = NULL;
    if (r->queue_tail) r->queue_tail->next = c; else r->queue_head = c;
    r->queue_tail = c;
  }
}

static void unlink_unanswered(rr_member *m, rr_conn *c) {
  for (rr_conn **pp = &m->unanswered; *pp; pp = &(*pp)->next) {
    if (*pp == c) { *pp = c->next; m->inflight--; return; }
  }
}

static void dispatch(rr *r);

/* A connection comes back (refused, or its worker left): try another worker. */
static void requeue(rr *r, rr_conn *c) {
  if (++c->attempts > r->member_count + 1) {
    r->dropped++;
    close_conn(c);
    return;
  }
  enqueue(r, c, 1);
}

static void on_handed(void *arg, int status) {
  rr_conn *c = arg;
  c->writing = 0;
  if (c->orphaned) { close_conn(c); return; }
  if (status == 0 && c->member) return; /* wait for the answer */
  rr *r = c->owner;
  if (c->member) unlink_unanswered(c->member, c);
  requeue(r, c);
  dispatch(r);
}

static rr_member *next_free_member(rr *r) {
  if (r->members == NULL) return NULL;
  rr_member *start = r->cursor && r->cursor->next ? r->cursor->next : r->members;
  rr_member *m = start;
  do {
    if (!m->leaving && m->inflight < r->window && member_channel(m)) return m;
    m = m->next ? m->next : r->members;
  } while (m != start);
  return NULL;
}

static void dispatch(rr *r) {
  while (r->queue_head) {
    rr_member *m = next_free_member(r);
    if (m == NULL) return;
    rr_conn *c = r->queue_head;
    r->queue_head = c->next;
    if (!r->queue_head) r->queue_tail = NULL;
    r->cursor = m;
    c->seq = ++m->next_seq;
    c->member = m;
    c->writing = 1;
    c->next = m->unanswered;
    m->unanswered = c;
    m->inflight++;
    int err = cl_channel_send_conn(member_channel(m), r->id, c->seq, &c->u.stream, on_handed, c);
    if (err == CL_CONN_SENT) {
      c->writing = 0; /* wait for the answer */
    } else if (err) {
      c->writing = 0;
      unlink_unanswered(m, c);
      enqueue(r, c, 1);
      /* this member can't take it now; stop until something changes */
      return;
    }
  }
}

static void on_answer(cl_channel *ch, uint32_t rr_id, uint32_t seq, int accepted) {
  rr *r = find_rr(rr_id);
  if (r == NULL) return;
  for (rr_member *m = r->members; m; m = m->next) {
    if ((cl_channel *)*m->channel_box != ch) continue;
    for (rr_conn *c = m->unanswered; c; c = c->next) {
      if (c->seq != seq) continue;
      unlink_unanswered(m, c);
      if (m->leaving && m->unanswered == NULL) {
        /* a leaving member that has answered everything is gone */
        rr_member *gone = m;
        c->member = NULL;
        if (accepted) { if (c->writing) c->orphaned = 1; else close_conn(c); }
        else if (!c->writing) requeue(r, c);
        for (rr_member **pp = &r->members; *pp; pp = &(*pp)->next)
          if (*pp == gone) { *pp = gone->next; break; }
        if (r->cursor == gone) r->cursor = NULL;
        luaL_unref(r->h.L, LUA_REGISTRYINDEX, gone->channel_ref);
        free(gone);
        dispatch(r);
        return;
      }
      if (accepted) {
        m->handed++;
        if (c->writing) c->orphaned = 1; else close_conn(c);
      } else if (c->writing) {
        c->member = NULL; /* requeued when its write completes */
      } else {
        requeue(r, c);
      }
      dispatch(r);
      return;
    }
    return;
  }
}

static void on_connection(uv_stream_t *server, int status) {
  rr *r = server->data;
  if (status < 0) return; /* EMFILE and friends: libuv retries on the next readiness */
  rr_conn *c = calloc(1, sizeof *c);
  if (c == NULL) return;
  c->owner = r;
  if (server->type == UV_TCP) uv_tcp_init(cl_loop(), &c->u.tcp);
  else uv_pipe_init(cl_loop(), &c->u.pipe, 0);
  c->u.handle.data = c;
  if (uv_accept(server, &c->u.stream) != 0) { close_conn(c); return; }
  r->accepted++;
  enqueue(r, c, 0);
  dispatch(r);
}

/* Detaches a member: its unanswered connections go back to the queue. */
static void remove_member(rr *r, rr_member *m) {
  if (!m->leaving) r->member_count--;
  for (rr_member **pp = &r->members; *pp; pp = &(*pp)->next) {
    if (*pp == m) { *pp = m->next; break; }
  }
  if (r->cursor == m) r->cursor = NULL;
  rr_conn *c = m->unanswered;
  while (c) {
    rr_conn *next = c->next;
    c->member = NULL;
    if (!c->writing) { c->attempts--; requeue(r, c); }
    c = next;
  }
  luaL_unref(r->h.L, LUA_REGISTRYINDEX, m->channel_ref);
  free(m);
}

static rr *check_rr(lua_State *L) { return (rr *)cl_handle_check(L, 1, TNAME); }

static rr_member *find_member(rr *r, lua_State *L, int idx) {
  cl_handle **box = luaL_checkudata(L, idx, "cluster.channel");
  for (rr_member *m = r->members; m; m = m->next) if (m->channel_box == box) return m;
  return NULL;
}

/* rr:add(channel): the worker on this channel takes connections from now on. */
static int rr_add(lua_State *L) {
  rr *r = check_rr(L);
  luaL_argcheck(L, cl_channel_test(L, 2) != NULL, 2, "expected an open channel");
  rr_member *existing = find_member(r, L, 2);
  if (existing) {
    /* a worker that closed and listens again while still answering: back in turn */
    if (existing->leaving) {
      existing->leaving = 0;
      r->member_count++;
      dispatch(r);
    }
    return 0;
  }
  rr_member *m = calloc(1, sizeof *m);
  if (m == NULL) return luaL_error(L, "rr:add: out of memory");
  m->channel_box = lua_touserdata(L, 2);
  lua_pushvalue(L, 2);
  m->channel_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  /* append, so the order of turns is the order of joining */
  rr_member **pp = &r->members;
  while (*pp) pp = &(*pp)->next;
  *pp = m;
  r->member_count++;
  dispatch(r);
  return 0;
}

/* rr:remove(channel[, gone]) -> remaining member count.
 * A worker that is still alive (gone false) leaves the rotation at once and answers what
 * it holds; a worker that is gone (its channel closed) gives its unanswered connections
 * back to be handed to another worker. */
static int rr_remove(lua_State *L) {
  rr *r = check_rr(L);
  rr_member *m = find_member(r, L, 2);
  int gone = lua_toboolean(L, 3) || cl_channel_test(L, 2) == NULL;
  if (m && (gone || m->unanswered == NULL)) {
    remove_member(r, m);
  } else if (m && !m->leaving) {
    m->leaving = 1;
    r->member_count--;
  }
  dispatch(r);
  lua_pushinteger(L, r->member_count);
  return 1;
}

/* rr:handed(channel) -> connections accepted by that worker */
static int rr_handed(lua_State *L) {
  rr *r = check_rr(L);
  rr_member *m = find_member(r, L, 2);
  lua_pushinteger(L, m ? (lua_Integer)m->handed : 0);
  return 1;
}

/* rr:stats() -> {accepted=, queued=, dropped=, members=} */
static int rr_stats(lua_State *L) {
  rr *r = check_rr(L);
  int queued = 0;
  for (rr_conn *c = r->queue_head; c; c = c->next) queued++;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)r->accepted); lua_setfield(L, -2, "accepted");
  lua_pushinteger(L, queued); lua_setfield(L, -2, "queued");
  lua_pushinteger(L, (lua_Integer)r->dropped); lua_setfield(L, -2, "dropped");
  lua_pushinteger(L, r->member_count); lua_setfield(L, -2, "members");
  return 1;
}

static int rr_id(lua_State *L) {
  lua_pushinteger(L, check_rr(L)->id);
  return 1;
}

static int rr_address(lua_State *L) {
  rr *r = check_rr(L);
  if (r->h.u.handle.type == UV_TCP) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    int err = uv_tcp_getsockname(&r->h.u.tcp, (struct sockaddr *)&ss, &len);
    if (err) return cl_push_fail(L, err, "getsockname");
    cl_push_sockaddr(L, (struct sockaddr *)&ss);
    return 1;
  }
  char buf[1024];
  size_t n = sizeof buf;
  int err = uv_pipe_getsockname(&r->h.u.pipe, buf, &n);
  if (err) return cl_push_fail(L, err, "getsockname");
  lua_pushlstring(L, buf, n);
  return 1;
}

static void rr_free(cl_handle *h) {
  rr *r = (rr *)h;
  for (rr **pp = &all_rr; *pp; pp = &(*pp)->next_rr) {
    if (*pp == r) { *pp = r->next_rr; break; }
  }
  while (r->members) {
    rr_member *m = r->members;
    r->members = m->next;
    for (rr_conn *c = m->unanswered; c; ) {
      rr_conn *next = c->next;
      if (c->writing) c->orphaned = 1; else close_conn(c);
      c = next;
    }
    luaL_unref(h->L, LUA_REGISTRYINDEX, m->channel_ref);
    free(m);
  }
  for (rr_conn *c = r->queue_head; c; ) {
    rr_conn *next = c->next;
    close_conn(c);
    c = next;
  }
  r->queue_head = r->queue_tail = NULL;
}

/* core.rr_listen(kind "tcp"|"pipe", host|path, port, backlog, ipv6Only[, window])
 * -> rr | nil, msg, code */
static int l_rr_listen(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  int is_tcp = strcmp(kind, "tcp") == 0;
  luaL_argcheck(L, is_tcp || strcmp(kind, "pipe") == 0, 1, "expected \"tcp\" or \"pipe\"");
  const char *where = luaL_checkstring(L, 2);
  int port = (int)luaL_optinteger(L, 3, 0);
  int backlog = (int)luaL_optinteger(L, 4, 511);
  int ipv6only = lua_toboolean(L, 5);
  int window = (int)luaL_optinteger(L, 6, 4);
  rr *r = (rr *)cl_handle_new(L, sizeof(rr), TNAME);
  r->h.on_free = rr_free;
  r->window = window > 0 ? window : 1;
  int err;
  const char *syscall = "bind";
  if (is_tcp) {
    struct sockaddr_storage ss;
    uv_tcp_init(cl_loop(), &r->h.u.tcp);
    err = cl_parse_addr(where, port, &ss);
    if (!err) err = uv_tcp_bind(&r->h.u.tcp, (struct sockaddr *)&ss, ipv6only ? UV_TCP_IPV6ONLY : 0);
  } else {
    uv_pipe_init(cl_loop(), &r->h.u.pipe, 0);
    err = uv_pipe_bind(&r->h.u.pipe, where);
  }
  r->h.u.handle.data = r;
  if (!err) err = uv_listen(&r->h.u.stream, backlog, on_connection);
  if (err) {
    cl_handle_close(&r->h);
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_pushfstring(L, "%s %s: %s", syscall, uv_err_name(err), uv_strerror(err));
    lua_pushstring(L, uv_err_name(err));
    lua_pushinteger(L, err);
    return 4;
  }
  r->id = next_rr_id++;
  r->next_rr = all_rr;
  all_rr = r;
  cl_channel_on_conn_answer(on_answer);
  return 1;
}

/* core.listen_fd(handle, backlog) -> true | nil, msg, code
 * listen(2) on a bound socket without starting libuv's accept watcher: the master makes
 * the socket for SCHED_NONE and learns at once whether the address is free (libuv defers
 * EADDRINUSE from bind to listen), while only the workers accept. */
static int l_listen_fd(lua_State *L) {
  cl_handle *h = cl_handle_test(L, 1);
  luaL_argcheck(L, h != NULL && !cl_handle_is_closing(h), 1, "expected an open tcp or pipe handle");
  int backlog = (int)luaL_optinteger(L, 2, 511);
  uv_os_fd_t fd;
  int err = uv_fileno(&h->u.handle, &fd);
  if (!err && h->u.handle.type == UV_TCP) {
    /* libuv keeps a bind's EADDRINUSE until uv_listen; the socket is then unbound,
     * and listen(2) would bind it to a random port. An unbound socket has port 0. */
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
      err = uv_translate_sys_error(errno);
    } else {
      int port = ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                          : ((struct sockaddr_in *)&ss)->sin_port;
      if (port == 0) err = UV_EADDRINUSE;
    }
  }
  if (!err && listen(fd, backlog) != 0) err = uv_translate_sys_error(errno);
  if (err) return cl_push_fail(L, err, "bind");
  lua_pushboolean(L, 1);
  return 1;
}

void cl_open_rr(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"add", rr_add}, {"remove", rr_remove}, {"handed", rr_handed}, {"stats", rr_stats},
    {"id", rr_id}, {"address", rr_address}, {"close", cl_handle_close_method},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_rr_listen);
  lua_setfield(L, -2, "rr_listen");
  lua_pushcfunction(L, l_listen_fd);
  lua_setfield(L, -2, "listen_fd");
}
