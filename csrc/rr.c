/* Round-robin distribution (SCHED_RR) in the master: a listening socket whose accepted
 * connections are handed to workers over their channels, entirely in C.
 *
 * Credit: a member (a worker's server on this key) holds at most `window` connections
 * it has not answered yet (workers answer in small batches); the rest wait in the distributor's queue. The master keeps its
 * copy of every handed connection until the worker answers: accepted -> closed here;
 * refused, or the worker left or died first -> handed to another worker. So connections
 * in flight to a dying worker are not lost. A refused connection goes only to members
 * that have not refused it (a worker refuses when its server closed or holds its
 * maxConnections); once every member has refused it, it is closed.
 *
 * The per-connection path avoids libuv's handle machinery: the listening socket is a
 * raw descriptor watched by a uv_poll, connections are accept4'ed into plain
 * descriptors, and the connections one loop turn gives a worker leave in one sendmsg
 * (cl_channel_send_conns). The master's copy is closed with close(2) once the worker
 * answers. Only when a channel is backed up does a connection get wrapped in a libuv
 * handle to queue behind the channel's other writes (cl_channel_send_conn). */
#define _GNU_SOURCE /* accept4 */
#include "channel.h"
#include "stream.h"

#include <limits.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#define TNAME "cluster.rr"

typedef struct rr rr;
typedef struct rr_member rr_member;

/* At most this many connections are accepted per readiness callback (then the loop
 * serves the channels), and at most this many leave in one hand-off message: libuv's
 * receiving side takes up to 64 descriptors per read. */
#define ACCEPT_BUDGET 64
#define BATCH_MAX CL_CONN_BATCH_MAX
/* After EMFILE and friends the listener rests this long; connections wait in the
 * kernel's backlog meanwhile instead of being accepted and dropped. */
#define ACCEPT_RETRY_MS 50
/* Connections a worker may hold unanswered. Workers answer in batches of a few
 * (csrc/channel.c, ANSWER_BATCH); the window is well above that. */
#define DEFAULT_WINDOW 16
/* The members a connection remembers having refused it; one refused by more is closed. */
#define REFUSERS_MAX 8

typedef union sockaddr_any {
  struct sockaddr sa;
  struct sockaddr_in in;
  struct sockaddr_in6 in6;
} sockaddr_any;

typedef struct rr_conn {
  int fd;                 /* the master's copy of the connection */
  sockaddr_any remote;    /* the peer (TCP), from accept4 */
  sockaddr_any local;     /* our end (TCP) */
  uv_stream_t *wrapped;   /* a libuv handle owning fd, when it went by the queued path */
  uint32_t rr_id;         /* its distributor, found by id: a write completing after the
                             distributor closed finds nothing and closes the connection */
  rr_member *member;      /* the worker holding it unanswered, or NULL while queued */
  struct rr_conn *next;   /* in the queue or in the member's unanswered list */
  uint32_t seq;
  int writing;            /* the hand-off write has not completed yet */
  int attempts;           /* times it came back (refused, or its worker left) */
  int refusals;           /* members that answered "refused" (or "not received") */
  uint32_t refused_by[REFUSERS_MAX]; /* their ids (rr_member.id) */
  int orphaned;           /* its distributor closed: close once the write completes */
} rr_conn;

struct rr_member {
  rr_member *next;
  uint32_t id;              /* unique in its distributor (a freed member's address is not) */
  cl_handle **channel_box;  /* the channel's userdata slot (kept alive by channel_ref) */
  int channel_ref;
  rr_conn *unanswered;
  int inflight;
  uint32_t next_seq;
  uint64_t handed;          /* connections this worker accepted */
  int leaving;              /* out of the rotation, waiting for its answers */
  int one_at_a_time;        /* a descriptor failed to arrive: it is short of descriptors,
                               so it gets one per message from now on */
  rr_conn *batch[BATCH_MAX]; /* assigned in this dispatch, not yet sent */
  int batch_n;
};

struct rr {
  cl_handle h;              /* a uv_poll on the listening socket */
  int fd;                   /* the listening socket */
  int is_tcp;
  sockaddr_any bound;       /* the listening address: every connection's local address,
                               unless it is a wildcard (then getsockname per connection) */
  int bound_wildcard;
  uv_timer_t *retry;        /* rests the listener after EMFILE; NULL until needed */
  uv_check_t *redispatch;   /* dispatches once the loop turn's answers are all read (see
                               dispatch_soon); NULL until needed */
  char *path;               /* a unix socket's bound path, unlinked at close */
  uint32_t id;
  int window;
  rr_member *members;
  rr_member *cursor;        /* the member that got the last connection */
  int member_count;
  uint32_t next_member_id;
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

static void on_wrapped_closed(uv_handle_t *h) { free(h); }

static void close_conn(rr_conn *c) {
  if (c->wrapped) uv_close((uv_handle_t *)c->wrapped, on_wrapped_closed);
  else close(c->fd);
  free(c);
}

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
  rr *r = find_rr(c->rr_id);
  if (c->orphaned || r == NULL) { close_conn(c); return; }
  if (status == 0 && c->member) return; /* wait for the answer */
  if (c->member) unlink_unanswered(c->member, c);
  requeue(r, c);
  dispatch(r);
}

static int has_refused(const rr_conn *c, const rr_member *m) {
  for (int i = 0; i < c->refusals && i < REFUSERS_MAX; i++) if (c->refused_by[i] == m->id) return 1;
  return 0;
}

/* Remembers that m refused c. */
static void note_refusal(rr_conn *c, const rr_member *m) {
  if (c->refusals < REFUSERS_MAX) c->refused_by[c->refusals] = m->id;
  c->refusals++;
}

/* Whether every member in the rotation has refused c (then nobody will take it). With
 * nobody in the rotation, c waits for whoever joins. */
static int refused_by_all(rr *r, const rr_conn *c) {
  int in_rotation = 0;
  for (rr_member *m = r->members; m; m = m->next) {
    if (m->leaving) continue;
    in_rotation = 1;
    if (c->refusals <= REFUSERS_MAX && !has_refused(c, m)) return 0;
  }
  return in_rotation;
}

/* The next member in turn with credit for c (one that has not refused it), or NULL. */
static rr_member *next_free_member(rr *r, const rr_conn *c) {
  if (r->members == NULL) return NULL;
  rr_member *start = r->cursor && r->cursor->next ? r->cursor->next : r->members;
  rr_member *m = start;
  do {
    if (!m->leaving && m->inflight < r->window && member_channel(m) && (c->refusals == 0 || !has_refused(c, m)))
      return m;
    m = m->next ? m->next : r->members;
  } while (m != start);
  return NULL;
}

/* Wraps a connection's descriptor in a libuv handle, for the queued hand-off path. */
static int wrap_conn(rr *r, rr_conn *c) {
  if (c->wrapped) return 0;
  uv_stream_t *s = malloc(r->is_tcp ? sizeof(uv_tcp_t) : sizeof(uv_pipe_t));
  if (s == NULL) return UV_ENOMEM;
  int err = r->is_tcp ? uv_tcp_init(cl_loop(), (uv_tcp_t *)s) : uv_pipe_init(cl_loop(), (uv_pipe_t *)s, 0);
  if (err) { free(s); return err; }
  err = r->is_tcp ? uv_tcp_open((uv_tcp_t *)s, c->fd) : uv_pipe_open((uv_pipe_t *)s, c->fd);
  if (err) { uv_close((uv_handle_t *)s, on_wrapped_closed); return err; }
  c->wrapped = s;
  return 0;
}

/* Takes a connection back from a member it could not be sent to. */
static void take_back(rr *r, rr_member *m, rr_conn *c) {
  c->writing = 0;
  unlink_unanswered(m, c);
  enqueue(r, c, 1);
}

/* Sends the connections assigned to m in this dispatch: in one message with all their
 * descriptors when the channel has nothing queued, else one by one behind the queue.
 * Returns 0, or -1 when the channel failed (the unsent connections are queued again). */
static int send_batch(rr *r, rr_member *m) {
  int n = m->batch_n;
  m->batch_n = 0;
  cl_channel *ch = member_channel(m);
  char frames[BATCH_MAX * CL_CONN_FRAME_MAX];
  size_t starts[BATCH_MAX + 1];
  int fds[BATCH_MAX];
  size_t len = 0;
  for (int i = 0; i < n; i++) {
    rr_conn *c = m->batch[i];
    starts[i] = len;
    len += cl_channel_conn_frame(frames + len, r->id, c->seq, r->is_tcp, &c->remote.sa, &c->local.sa);
    fds[i] = c->fd;
  }
  starts[n] = len;
  int err = ch ? cl_channel_send_conns(ch, frames, len, fds, n) : UV_EPIPE;
  if (err == CL_CONN_SENT) return 0;
  int i = 0;
  if (err == UV_EAGAIN) {
    for (; i < n; i++) {
      rr_conn *c = m->batch[i];
      err = wrap_conn(r, c);
      if (err) {
        /* the descriptor can't be queued: drop this connection, keep the rest going */
        unlink_unanswered(m, c);
        r->dropped++;
        close_conn(c);
        continue;
      }
      err = cl_channel_send_conn(ch, frames + starts[i], starts[i + 1] - starts[i], c->wrapped, on_handed, c);
      if (err == 0) c->writing = 1;
      else if (err != CL_CONN_SENT) break;
    }
    if (i == n) return 0;
  }
  /* the channel failed: the rest go back to the front of the queue, in order */
  for (int j = n - 1; j >= i; j--) take_back(r, m, m->batch[j]);
  return -1;
}

/* Assigns queued connections to members with credit, in turn, then sends each
 * member's share. A channel that fails stops the round until something changes. A
 * refused connection at the head waits for a member that has not refused it (the
 * others would refuse what follows it too), and is closed once all have. */
static void dispatch(rr *r) {
  int failed = 0;
  rr_member *m;
  rr_conn *c;
  while (!failed && (c = r->queue_head) != NULL) {
    m = next_free_member(r, c);
    if (m == NULL && !(c->refusals > 0 && refused_by_all(r, c))) break;
    r->queue_head = c->next;
    if (!r->queue_head) r->queue_tail = NULL;
    if (m == NULL) {
      r->dropped++;
      close_conn(c);
      continue;
    }
    r->cursor = m;
    c->seq = ++m->next_seq;
    c->member = m;
    c->next = m->unanswered;
    m->unanswered = c;
    m->inflight++;
    m->batch[m->batch_n++] = c;
    if (m->batch_n == (m->one_at_a_time ? 1 : BATCH_MAX) && send_batch(r, m) != 0) failed = 1;
  }
  for (m = r->members; m; m = m->next) {
    if (m->batch_n > 0) send_batch(r, m);
  }
}

static void on_redispatch(uv_check_t *check) {
  uv_check_stop(check);
  dispatch(check->data);
}

/* Answers return credit: dispatching at each one would send the queue's connections one
 * per message, as credit trickles back. Dispatching once after this loop turn's reads
 * (a check handle runs after the poll phase) gives each worker its share of the queue
 * in one message. If the check can't be had, dispatch at once. */
static void dispatch_soon(rr *r) {
  if (r->redispatch == NULL) {
    r->redispatch = malloc(sizeof *r->redispatch);
    if (r->redispatch == NULL) { dispatch(r); return; }
    uv_check_init(cl_loop(), r->redispatch);
    uv_unref((uv_handle_t *)r->redispatch);
    r->redispatch->data = r;
  }
  uv_check_start(r->redispatch, on_redispatch);
}

static void on_answer(cl_channel *ch, uint32_t rr_id, uint32_t seq, int answer) {
  rr *r = find_rr(rr_id);
  if (r == NULL) return;
  int accepted = answer == CL_CONN_ACCEPTED;
  for (rr_member *m = r->members; m; m = m->next) {
    if ((cl_channel *)*m->channel_box != ch) continue;
    if (answer == CL_CONN_NO_DESCRIPTOR) m->one_at_a_time = 1;
    for (rr_conn *c = m->unanswered; c; c = c->next) {
      if (c->seq != seq) continue;
      unlink_unanswered(m, c);
      if (!accepted) note_refusal(c, m);
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
        dispatch_soon(r);
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
      dispatch_soon(r);
      return;
    }
    return;
  }
}

static void on_readable(uv_poll_t *p, int status, int events);

static void on_accept_retry(uv_timer_t *t) {
  rr *r = t->data;
  if (!cl_handle_is_closing(&r->h)) uv_poll_start(&r->h.u.poll, UV_READABLE, on_readable);
}

/* Out of descriptors (or memory): stop accepting for a moment. */
static void rest_listener(rr *r) {
  if (r->retry == NULL) {
    r->retry = malloc(sizeof *r->retry);
    if (r->retry == NULL) return; /* keep polling: level-triggered, it retries at once */
    uv_timer_init(cl_loop(), r->retry);
    r->retry->data = r;
    if (!uv_has_ref(&r->h.u.handle)) uv_unref((uv_handle_t *)r->retry);
  }
  uv_poll_stop(&r->h.u.poll);
  uv_timer_start(r->retry, on_accept_retry, ACCEPT_RETRY_MS, 0);
}

static void on_readable(uv_poll_t *p, int status, int events) {
  rr *r = p->data;
  (void)events;
  if (status < 0) return;
  for (int i = 0; i < ACCEPT_BUDGET; i++) {
    sockaddr_any remote;
    socklen_t remote_len = sizeof remote;
    remote.sa.sa_family = AF_UNSPEC;
    int fd = accept4(r->fd, r->is_tcp ? &remote.sa : NULL, r->is_tcp ? &remote_len : NULL,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) rest_listener(r);
      break; /* EAGAIN: the backlog is empty */
    }
    rr_conn *c = calloc(1, sizeof *c);
    if (c == NULL) { close(fd); rest_listener(r); break; }
    c->fd = fd;
    c->rr_id = r->id;
    if (r->is_tcp) {
      c->remote = remote;
      socklen_t local_len = sizeof c->local;
      if (!r->bound_wildcard) c->local = r->bound;
      else if (getsockname(fd, &c->local.sa, &local_len) != 0) c->local.sa.sa_family = AF_UNSPEC;
    }
    r->accepted++;
    enqueue(r, c, 0);
  }
  dispatch(r);
}

/* Whether a worker that died before answering had already served this connection (its
 * answer was still held back, csrc/channel.c): handing it on would leave the client
 * waiting for the answer to a request nobody has. Such a connection is closed instead,
 * as the worker's death would have closed it. A TCP connection tells by its byte counts
 * (read from or written to); a unix socket keeps none, so the worker marks one as its
 * own before it first reads from it (F_SETOWN on the open file both copies share). */
/* glibc's struct tcp_info stops at tcpi_total_retrans; Linux (4.6+) goes on, append-only. */
struct tcp_info_bytes {
  struct tcp_info base;
  uint64_t pacing_rate, max_pacing_rate;
  uint64_t bytes_acked;      /* bytes we sent that the peer acknowledged */
  uint64_t bytes_received;   /* bytes the peer sent, read or not */
};
_Static_assert(offsetof(struct tcp_info_bytes, pacing_rate) == 104, "struct tcp_info layout");

static int was_served(rr *r, rr_conn *c) {
  if (!r->is_tcp) return fcntl(c->fd, F_GETOWN) > 0;
  struct tcp_info_bytes ti;
  socklen_t len = sizeof ti;
  memset(&ti, 0, sizeof ti);
  if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return 0;
  if (len < sizeof ti) return 0; /* an older kernel: hand it on, as before */
  int unread = 0;
  if (ioctl(c->fd, FIONREAD, &unread) != 0) return 0;
  /* the peer's FIN counts in bytes_received (one sequence number), not in FIONREAD */
  int state = ti.base.tcpi_state;
  uint64_t received = ti.bytes_received;
  if (received > 0 && (state == TCP_CLOSE_WAIT || state == TCP_LAST_ACK || state == TCP_CLOSING ||
                       state == TCP_TIME_WAIT || state == TCP_CLOSE)) received--;
  return received > (uint64_t)unread || ti.bytes_acked > 0 || ti.base.tcpi_unacked > 0;
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
    if (c->writing) {
      /* requeued when its write completes */
    } else if (was_served(r, c)) {
      r->dropped++;
      close_conn(c);
    } else {
      c->attempts--;
      requeue(r, c);
    }
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
  m->id = ++r->next_member_id;
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
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(r->fd, (struct sockaddr *)&ss, &len) != 0)
    return cl_push_fail(L, uv_translate_sys_error(errno), "getsockname");
  if (r->is_tcp) {
    cl_push_sockaddr(L, (struct sockaddr *)&ss);
    return 1;
  }
  const struct sockaddr_un *un = (const struct sockaddr_un *)&ss;
  size_t n = len > offsetof(struct sockaddr_un, sun_path) ? len - offsetof(struct sockaddr_un, sun_path) : 0;
  while (n > 0 && un->sun_path[n - 1] == '\0') n--;
  lua_pushlstring(L, un->sun_path, n);
  return 1;
}

/* rr:close([callback]): stops distributing. The listening socket closes now, as a
 * libuv server's does, so new connections are refused at once; a unix socket's path is
 * unlinked now, by the name it was bound by (relative to the current directory, as
 * libuv's pipes do). */
static int rr_close(lua_State *L) {
  rr *r = *(rr **)luaL_checkudata(L, 1, TNAME);
  if (r == NULL || cl_handle_is_closing(&r->h)) return 0;
  int n = cl_handle_close_method(L); /* stops the poll: epoll forgets the descriptor */
  if (r->fd >= 0) {
    close(r->fd);
    r->fd = -1;
  }
  if (r->path) {
    unlink(r->path);
    free(r->path);
    r->path = NULL;
  }
  return n;
}

static void free_closed(uv_handle_t *t) { free(t); }

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
  if (r->retry) uv_close((uv_handle_t *)r->retry, free_closed);
  if (r->redispatch) uv_close((uv_handle_t *)r->redispatch, free_closed);
  free(r->path);
  /* closed without rr:close (at exit): the poll is closed, so epoll no longer has it */
  if (r->fd >= 0) close(r->fd);
}

/* A listening socket, made the way libuv's uv_tcp_bind / uv_pipe_bind make theirs
 * (SO_REUSEADDR; IPV6_V6ONLY set either way; ENOENT reported as EACCES for a unix
 * path), but with bind's EADDRINUSE reported at once. Returns the descriptor, or a
 * libuv error with *syscall naming the step that failed. */
static int open_listener(int is_tcp, const char *where, int port, int backlog, int ipv6only,
                         const char **syscall) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  memset(&ss, 0, sizeof ss);
  *syscall = "bind";
  if (is_tcp) {
    int err = cl_parse_addr(where, port, &ss);
    if (err) return err;
    sslen = ss.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
  } else {
    struct sockaddr_un *un = (struct sockaddr_un *)&ss;
    if (strlen(where) >= sizeof un->sun_path) return UV_ENAMETOOLONG;
    un->sun_family = AF_UNIX;
    strcpy(un->sun_path, where);
    sslen = sizeof *un;
  }
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) { *syscall = "socket"; return uv_translate_sys_error(errno); }
  int on = 1, err = 0;
  if (is_tcp) {
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (ss.ss_family == AF_INET6) {
      int v6only = ipv6only ? 1 : 0;
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
    }
  }
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0) {
    err = errno == ENOENT && !is_tcp ? UV_EACCES
        : errno == EAFNOSUPPORT ? UV_EINVAL : uv_translate_sys_error(errno);
  } else if (listen(fd, backlog) != 0) {
    err = uv_translate_sys_error(errno);
    *syscall = "listen";
    if (!is_tcp) unlink(where);
  }
  if (err) { close(fd); return err; }
  return fd;
}

/* core.rr_listen(kind "tcp"|"pipe", host|path, port, backlog, ipv6Only[, window])
 * -> rr | nil, msg, code */
static int l_rr_listen(lua_State *L) {
  const char *kind = luaL_checkstring(L, 1);
  int is_tcp = strcmp(kind, "tcp") == 0;
  luaL_argcheck(L, is_tcp || strcmp(kind, "pipe") == 0, 1, "expected \"tcp\" or \"pipe\"");
  const char *where = luaL_checkstring(L, 2);
  lua_Integer port = luaL_optinteger(L, 3, 0);
  luaL_argcheck(L, port >= 0 && port <= 65535, 3, "port out of range");
  lua_Integer backlog = luaL_optinteger(L, 4, 511);
  luaL_argcheck(L, backlog >= 0 && backlog <= INT_MAX, 4, "backlog out of range");
  int ipv6only = lua_toboolean(L, 5);
  lua_Integer window = luaL_optinteger(L, 6, DEFAULT_WINDOW);
  luaL_argcheck(L, window >= 1 && window <= INT_MAX, 6, "window out of range");
  const char *syscall;
  int fd = open_listener(is_tcp, where, (int)port, (int)backlog, ipv6only, &syscall);
  if (fd < 0) {
    cl_push_fail(L, fd, syscall);
    lua_pushinteger(L, fd);
    return 4;
  }
  char *path = is_tcp ? NULL : strdup(where);
  rr *r = (rr *)cl_handle_new(L, sizeof(rr), TNAME);
  r->h.on_free = rr_free;
  r->fd = fd;
  r->is_tcp = is_tcp;
  r->path = path;
  r->window = (int)window;
  if (is_tcp) {
    socklen_t bound_len = sizeof r->bound;
    if (getsockname(fd, &r->bound.sa, &bound_len) != 0) r->bound_wildcard = 1;
    else if (r->bound.sa.sa_family == AF_INET) r->bound_wildcard = r->bound.in.sin_addr.s_addr == htonl(INADDR_ANY);
    else r->bound_wildcard = IN6_IS_ADDR_UNSPECIFIED(&r->bound.in6.sin6_addr);
  }
  uv_poll_init_socket(cl_loop(), &r->h.u.poll, fd);
  r->h.u.handle.data = r;
  uv_poll_start(&r->h.u.poll, UV_READABLE, on_readable);
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
    {"id", rr_id}, {"address", rr_address}, {"close", rr_close},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_rr_listen);
  lua_setfield(L, -2, "rr_listen");
  lua_pushcfunction(L, l_listen_fd);
  lua_setfield(L, -2, "listen_fd");
}
