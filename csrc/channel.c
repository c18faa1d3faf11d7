/* The IPC channel: framed messages over a libuv IPC pipe that can carry file descriptors.
 *
 * Sending never blocks the loop. Frames without a handle are appended to a per-channel
 * buffer and handed to libuv in one write per loop iteration (a prepare handle flushes
 * every channel with pending bytes), which keeps order and batches small messages.
 * A frame with a handle flushes what is pending, then goes out alone with uv_write2 so
 * the descriptor rides with its own bytes. libuv queues writes in order.
 *
 * Receiving: bytes accumulate in `in`; every complete frame is decoded and given to the
 * Lua callback (flags, value, handle). Descriptors that arrive are accepted at once into
 * stream/udp userdata and queued; a frame flagged CL_FRAME_HANDLE takes the oldest one.
 * A malformed or oversized frame closes the channel and reports why to on_close. */
#include "channel.h"
#include "codec.h"
#include "stream.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#define TNAME "cluster.channel"
#define CB_MESSAGE 0
#define CB_CLOSE 1
#define CB_CONN 2
#define READ_CHUNK (64 * 1024)

struct cl_channel {
  cl_handle h;
  cl_buf in;
  size_t in_pos;          /* start of the first unparsed frame in `in` */
  cl_buf out;             /* frames not yet handed to libuv */
  int out_cbs;            /* registry ref of a table of send callbacks for `out`, or LUA_NOREF */
  cl_channel *next_pending; /* in the flush list while `out` has bytes, or reread is set */
  int in_flush_list;
  int closed_reported;
  int reading;
  uint64_t last_beat;     /* loop time (ms) of the last heartbeat received */
  uint64_t beats;
  int answers_held;       /* accepted hand-offs answered in `out` but not yet flushed */
  uv_timer_t *answer_timer; /* flushes held answers; NULL until a worker first needs it */
  int cb_writes;          /* write requests with send callbacks not yet called back */
  int reread;             /* reading ended early (see on_read): start it again next turn */
};

/* A worker answers the connections it accepts in batches: the master needs an answer
 * to return credit and to close its copy, not at once; every answer sent alone costs a
 * write here and a wake-up there per connection. Held answers leave with any other
 * flush, when ANSWER_BATCH are held, or after ANSWER_DELAY_MS. The master's credit
 * window (csrc/rr.c) is larger than the batch, so holding never stalls it. A refusal
 * leaves at once: that connection waits for another worker. */
#define ANSWER_BATCH 4
#define ANSWER_DELAY_MS 1

/* The worker's heartbeat timer: one channel to the master per process. */
static uv_timer_t beat_timer;
static int beat_timer_ready = 0;
static cl_channel *beat_channel = NULL;

typedef struct write_req {
  uv_write_t req;
  cl_channel *ch;        /* the channel (alive until its requests are called back) */
  lua_State *L;
  char *data;
  int cbs;               /* registry ref: table of callbacks, or a single function, or LUA_NOREF */
  int send_handle_ref;   /* keeps the sent handle's userdata alive until written */
  void (*done)(void *arg, int status); /* C completion (connection hand-off) */
  void *done_arg;
  char small[CL_CONN_FRAME_MAX]; /* a whole hand-off frame, kept here to avoid a malloc */
} write_req;

static cl_conn_answer_fn conn_answer_fn = NULL;
void cl_channel_on_conn_answer(cl_conn_answer_fn fn) { conn_answer_fn = fn; }

static cl_channel *flush_list = NULL;
static uv_prepare_t flusher;
static int flusher_ready = 0;

static void flush(cl_channel *ch, int in_loop);
static void restart_reading(cl_channel *ch);

static void on_prepare(uv_prepare_t *p) {
  cl_channel *ch;
  while ((ch = flush_list) != NULL) {
    flush_list = ch->next_pending;
    ch->in_flush_list = 0;
    ch->next_pending = NULL;
    flush(ch, 1);
    if (ch->reread) restart_reading(ch);
  }
  uv_prepare_stop(p);
}

static void schedule_flush(cl_channel *ch) {
  if (ch->in_flush_list) return;
  if (!flusher_ready) {
    uv_prepare_init(cl_loop(), &flusher);
    flusher_ready = 1;
  }
  ch->in_flush_list = 1;
  ch->next_pending = flush_list;
  flush_list = ch;
  uv_prepare_start(&flusher, on_prepare);
}

static void unlink_flush(cl_channel *ch) {
  if (!ch->in_flush_list) return;
  for (cl_channel **pp = &flush_list; *pp; pp = &(*pp)->next_pending) {
    if (*pp == ch) { *pp = ch->next_pending; break; }
  }
  ch->in_flush_list = 0;
}

/* Calls the callbacks kept for a write: each gets nil or an error object. */
static void run_write_cbs(lua_State *L, int cbs, int status) {
  if (cbs == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, cbs);
  luaL_unref(L, LUA_REGISTRYINDEX, cbs);
  if (lua_isfunction(L, -1)) {
    if (status) cl_push_error_object(L, status, "write", NULL); else lua_pushnil(L);
    cl_call(L, 1);
    return;
  }
  lua_Integer n = luaL_len(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    if (status) cl_push_error_object(L, status, "write", NULL); else lua_pushnil(L);
    cl_call(L, 1);
  }
  lua_pop(L, 1);
}

static void on_written(uv_write_t *req, int status) {
  write_req *wr = (write_req *)req;
  lua_State *L = wr->L;
  if (wr->done) {
    void (*done)(void *, int) = wr->done;
    void *arg = wr->done_arg;
    free(wr);
    done(arg, status);
    return;
  }
  free(wr->data);
  luaL_unref(L, LUA_REGISTRYINDEX, wr->send_handle_ref);
  int cbs = wr->cbs;
  if (cbs != LUA_NOREF) wr->ch->cb_writes--;
  free(wr);
  run_write_cbs(L, cbs, status);
}

/* A write request with nothing attached: no buffer, no Lua callbacks, no C completion. */
static write_req *new_write_req(cl_channel *ch) {
  write_req *wr = malloc(sizeof *wr);
  if (wr == NULL) return NULL;
  wr->ch = ch;
  wr->L = ch->h.L;
  wr->data = NULL;
  wr->cbs = LUA_NOREF;
  wr->send_handle_ref = LUA_NOREF;
  wr->done = NULL;
  wr->done_arg = NULL;
  return wr;
}

static int submit(cl_channel *ch, char *data, size_t len, int cbs, uv_stream_t *send_handle, int send_handle_ref) {
  write_req *wr = new_write_req(ch);
  if (wr == NULL) { free(data); return UV_ENOMEM; }
  wr->data = data;
  wr->cbs = cbs;
  wr->send_handle_ref = send_handle_ref;
  uv_buf_t buf = uv_buf_init(data, (unsigned)len);
  int err = send_handle
    ? uv_write2(&wr->req, &ch->h.u.stream, &buf, 1, send_handle, on_written)
    : uv_write(&wr->req, &ch->h.u.stream, &buf, 1, on_written);
  if (err) {
    free(data);
    luaL_unref(wr->L, LUA_REGISTRYINDEX, send_handle_ref);
    free(wr);
  } else if (cbs != LUA_NOREF) {
    ch->cb_writes++;
  }
  return err;
}

/* Hands the pending bytes to the pipe. When libuv holds no queued write (uv_try_write
 * refuses otherwise, which keeps the order) they are written at once and the buffer is
 * kept for the next turn: no malloc, no write request, no epoll re-arm. Only what the
 * pipe does not take now becomes a libuv write request. Send callbacks waiting on these
 * bytes run only when called from the loop (in_loop), never inside a send or a close,
 * and never before those of an earlier request (a frame with a handle), which libuv
 * calls back on a later turn: such bytes go as a request too, called back in order. */
/* The held answers are on their way (or the buffer was written another way). */
static void release_answers(cl_channel *ch) {
  if (ch->answers_held) {
    ch->answers_held = 0;
    uv_timer_stop(ch->answer_timer); /* held answers always have their timer */
  }
}

static void flush(cl_channel *ch, int in_loop) {
  release_answers(ch);
  if (ch->out.len == 0 || cl_handle_is_closing(&ch->h)) return;
  if (ch->out_cbs == LUA_NOREF || (in_loop && ch->cb_writes == 0)) {
    uv_buf_t b = uv_buf_init(ch->out.data, (unsigned)ch->out.len);
    int n = uv_try_write(&ch->h.u.stream, &b, 1);
    if (n == (int)ch->out.len) {
      int cbs = ch->out_cbs;
      ch->out_cbs = LUA_NOREF;
      ch->out.len = 0;
      if (ch->out.cap > 1024 * 1024) cl_buf_free(&ch->out); /* don't keep a huge buffer */
      run_write_cbs(ch->h.L, cbs, 0);
      return;
    }
    if (n > 0) {
      memmove(ch->out.data, ch->out.data + n, ch->out.len - (size_t)n);
      ch->out.len -= (size_t)n;
    } else if (n < 0 && n != UV_EAGAIN) {
      /* the peer is gone (EPIPE, ECONNRESET): these bytes can't go; their callbacks
       * hear so now, before the read side reports the channel's end ('disconnect'),
       * where a libuv request would call back a turn after it */
      int cbs = ch->out_cbs;
      ch->out_cbs = LUA_NOREF;
      ch->out.len = 0;
      run_write_cbs(ch->h.L, cbs, n);
      return;
    }
  }
  char *data = ch->out.data;
  size_t len = ch->out.len;
  int cbs = ch->out_cbs;
  ch->out.data = NULL;
  ch->out.len = ch->out.cap = 0;
  ch->out_cbs = LUA_NOREF;
  int err = submit(ch, data, len, cbs, NULL, LUA_NOREF);
  if (err) run_write_cbs(ch->h.L, cbs, err);
}

/* In the channel's metatable: a mark is one lookup by a light userdata key, where
 * luaL_checkudata looks the metatable up by name (ch:answer runs once per connection). */
static const char CHANNEL_MARK = 0;

static cl_channel *check_channel(lua_State *L, int idx) {
  return (cl_channel *)cl_check_marked(L, idx, &CHANNEL_MARK, TNAME);
}

static void put_le32(char *p, uint32_t v) {
  p[0] = (char)(v & 0xff); p[1] = (char)((v >> 8) & 0xff);
  p[2] = (char)((v >> 16) & 0xff); p[3] = (char)((v >> 24) & 0xff);
}

static uint32_t get_le32(const char *p) {
  const unsigned char *u = (const unsigned char *)p;
  return (uint32_t)u[0] | ((uint32_t)u[1] << 8) | ((uint32_t)u[2] << 16) | ((uint32_t)u[3] << 24);
}

/* Rolls b back to `start` after a refused frame; a buffer holding nothing else lets go
 * of what the refused frame made it grow to (a message over the limit may be huge). */
static void refuse_frame(cl_buf *b, size_t start) {
  b->len = start;
  if (start == 0 && b->cap > 1024 * 1024) cl_buf_free(b);
}

/* Encodes value at idx as a frame appended to b. Returns 0, or -1 with the message for
 * a value that can't be sent on the stack (b as it was): the caller raises it, after
 * freeing what it must. */
static int encode_frame(lua_State *L, cl_buf *b, int idx, int flags, const char *fname) {
  size_t start = b->len;
  if (cl_buf_reserve(b, CL_FRAME_HEADER) != 0) {
    lua_pushfstring(L, "%s: out of memory", fname);
    return -1;
  }
  b->len += CL_FRAME_HEADER;
  if (cl_codec_encode(L, idx, b, "message") != 0) {
    refuse_frame(b, start);
    lua_pushfstring(L, "%s: %s", fname, lua_tostring(L, -1));
    return -1;
  }
  size_t payload = b->len - start - CL_FRAME_HEADER;
  if (payload > CL_MAX_MESSAGE) {
    refuse_frame(b, start);
    lua_pushfstring(L, "%s: message is %I bytes encoded, over the limit of %d bytes", fname,
                    (lua_Integer)payload, (int)CL_MAX_MESSAGE);
    return -1;
  }
  put_le32(b->data + start, (uint32_t)payload);
  b->data[start + 4] = (char)flags;
  return 0;
}

static void add_cb(lua_State *L, int *slot, int idx) {
  if (*slot == LUA_NOREF) {
    lua_newtable(L);
    *slot = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, *slot);
  lua_pushvalue(L, idx);
  lua_rawseti(L, -2, luaL_len(L, -2) + 1);
  lua_pop(L, 1);
}

/* Bytes waiting to be written past which send answers false (Node's: twice 64 KiB
 * queued on its channel): the message still goes; the sender may wait for a callback. */
#define SEND_BACKLOG_LIMIT (128 * 1024)

/* Pushes send's answer: true, or false once SEND_BACKLOG_LIMIT bytes or more wait. */
static int push_backlog_ok(lua_State *L, cl_channel *ch) {
  lua_pushboolean(L, ch->out.len + uv_stream_get_write_queue_size(&ch->h.u.stream) < SEND_BACKLOG_LIMIT);
  return 1;
}

/* ch:send(internal, value[, handle][, callback]) -> true | false (sent, but the backlog
 * is over SEND_BACKLOG_LIMIT) | nil, msg, code (not sent).
 * Raises when the value can't be encoded or is over the size limit. */
static int ch_send(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  int flags = lua_toboolean(L, 2) ? CL_FRAME_INTERNAL : 0;
  luaL_checkany(L, 3);
  cl_handle *send = NULL;
  if (!lua_isnoneornil(L, 4)) {
    send = cl_handle_test(L, 4);
    luaL_argcheck(L, send != NULL && !cl_handle_is_closing(send), 4, "expected an open net server, socket or dgram socket");
    uv_handle_type t = send->u.handle.type;
    luaL_argcheck(L, t == UV_TCP || t == UV_NAMED_PIPE || t == UV_UDP, 4, "this kind of handle cannot be sent");
  }
  if (!lua_isnoneornil(L, 5)) luaL_checktype(L, 5, LUA_TFUNCTION);
  if (send == NULL) {
    if (encode_frame(L, &ch->out, 3, flags, "worker:send") != 0) return lua_error(L);
    if (!lua_isnoneornil(L, 5)) add_cb(L, &ch->out_cbs, 5);
    schedule_flush(ch);
    return push_backlog_ok(L, ch);
  }
  cl_buf frame = {0};
  if (encode_frame(L, &frame, 3, flags | CL_FRAME_HANDLE, "worker:send") != 0) {
    cl_buf_free(&frame);
    return lua_error(L);
  }
  flush(ch, 0);
  send->alone = 0; /* the other side holds its file too */
  cl_handle_flush(send); /* (what this side wrote goes before anything the other writes) */
  int cbs = LUA_NOREF;
  if (!lua_isnoneornil(L, 5)) { lua_pushvalue(L, 5); cbs = luaL_ref(L, LUA_REGISTRYINDEX); }
  lua_pushvalue(L, 4);
  int href = luaL_ref(L, LUA_REGISTRYINDEX);
  int err = submit(ch, frame.data, frame.len, cbs, &send->u.stream, href);
  if (err) {
    luaL_unref(L, LUA_REGISTRYINDEX, cbs);
    return cl_push_fail(L, err, "send");
  }
  return push_backlog_ok(L, ch);
}

static char *put_addr(char *p, const struct sockaddr *sa) {
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    memcpy(p, &in->sin_port, 2);
    memcpy(p + 2, &in->sin_addr, 4);
    return p + 6;
  }
  const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
  memcpy(p, &in6->sin6_port, 2);
  memcpy(p + 2, &in6->sin6_addr, 16);
  return p + 18;
}

size_t cl_channel_conn_frame(char *out, uint32_t rr_id, uint32_t seq, int is_tcp,
                             const struct sockaddr *remote, const struct sockaddr *local) {
  out[4] = (char)(CL_FRAME_CONN | CL_FRAME_HANDLE);
  put_le32(out + 5, rr_id);
  put_le32(out + 9, seq);
  /* the worker accepts it into a handle of this kind without asking the kernel */
  out[13] = (char)(is_tcp ? 1 : 2);
  char *p = out + 14;
  int family = remote ? remote->sa_family : AF_UNSPEC;
  if (is_tcp && (family == AF_INET || family == AF_INET6) && local && local->sa_family == family) {
    *p++ = (char)(family == AF_INET ? 4 : 6);
    p = put_addr(p, remote);
    p = put_addr(p, local);
  }
  size_t len = (size_t)(p - out);
  put_le32(out, (uint32_t)(len - CL_FRAME_HEADER));
  return len;
}

/* Descriptors left with the first bytes of frames whose rest can't be queued (out of
 * memory): the stream is out of step, so it ends. Shutting the socket down makes both
 * sides read EOF, and the channel closes the usual way, from the loop; the connections
 * stay unanswered, so the worker's leaving hands them on. Returns CL_CONN_SENT. */
static int break_off(uv_os_fd_t fd) {
  shutdown(fd, SHUT_RDWR);
  return CL_CONN_SENT;
}

int cl_channel_send_conns(cl_channel *ch, const char *frames, size_t len, const int *fds, int n) {
  if (cl_handle_is_closing(&ch->h)) return UV_EPIPE;
  if (n < 1 || n > CL_CONN_BATCH_MAX) return UV_EINVAL;
  flush(ch, 0); /* keep order with messages queued before these connections */
  /* the same rule as uv_try_write: nothing may overtake what libuv holds queued */
  if (ch->out.len > 0 || uv_stream_get_write_queue_size(&ch->h.u.stream) > 0) return UV_EAGAIN;
  uv_os_fd_t fd;
  int err = uv_fileno(&ch->h.u.handle, &fd);
  if (err) return err;
  union {
    char buf[CMSG_SPACE(sizeof(int) * CL_CONN_BATCH_MAX)];
    struct cmsghdr align;
  } control;
  memset(&control, 0, sizeof control);
  struct iovec iov = { .iov_base = (void *)frames, .iov_len = len };
  struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n) };
  struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
  cmsg->cmsg_level = SOL_SOCKET;
  cmsg->cmsg_type = SCM_RIGHTS;
  cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
  memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)n);
  ssize_t sent;
  do sent = sendmsg(fd, &msg, 0); while (sent < 0 && errno == EINTR);
  if (sent < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? UV_EAGAIN : uv_translate_sys_error(errno);
  if ((size_t)sent < len) {
    /* the descriptors left with the first bytes; the rest of the frames queue */
    char *rest = malloc(len - (size_t)sent);
    if (rest == NULL) return break_off(fd);
    memcpy(rest, frames + sent, len - (size_t)sent);
    /* fails only on a closing channel: the frames die with it, and the worker's exit
     * hands its unanswered connections to another worker */
    submit(ch, rest, len - (size_t)sent, LUA_NOREF, NULL, LUA_NOREF);
  }
  return CL_CONN_SENT;
}

int cl_channel_send_conn(cl_channel *ch, const char *frame, size_t len, uv_stream_t *conn,
                         void (*done)(void *arg, int status), void *arg) {
  if (cl_handle_is_closing(&ch->h)) return UV_EPIPE;
  if (len > CL_CONN_FRAME_MAX) return UV_EINVAL;
  flush(ch, 0); /* keep order with messages queued before this connection */
  size_t off = 0;
  /* Written at once when libuv holds nothing queued (its try_write refuses otherwise,
   * which keeps the order): no request, no callback, no epoll re-arm. */
  uv_buf_t tb = uv_buf_init((char *)frame, (unsigned)len);
  int n = uv_try_write2(&ch->h.u.stream, &tb, 1, conn);
  if (n == (int)len) return CL_CONN_SENT;
  if (n > 0) off = (size_t)n; /* the descriptor left with the first bytes */
  else if (n != UV_EAGAIN) return n;
  write_req *wr = new_write_req(ch);
  if (wr == NULL) {
    if (off == 0) return UV_ENOMEM;
    uv_os_fd_t fd;
    return uv_fileno(&ch->h.u.handle, &fd) == 0 ? break_off(fd) : UV_ENOMEM;
  }
  wr->done = done;
  wr->done_arg = arg;
  memcpy(wr->small, frame + off, len - off);
  uv_buf_t buf = uv_buf_init(wr->small, (unsigned)(len - off));
  int err = off ? uv_write(&wr->req, &ch->h.u.stream, &buf, 1, on_written)
                : uv_write2(&wr->req, &ch->h.u.stream, &buf, 1, conn, on_written);
  /* uv_write fails only on a closing channel: a partly written frame dies with it */
  if (err) free(wr);
  return err;
}

static void on_answer_timer(uv_timer_t *t) {
  cl_channel *ch = t->data;
  if (!cl_handle_is_closing(&ch->h)) schedule_flush(ch);
}

/* Appends the worker's answer to a handed connection; accepted ones may be held a
 * little (see ANSWER_BATCH), others leave in this loop turn. Returns 0 or UV_ENOMEM. */
static int queue_answer(cl_channel *ch, uint32_t rr_id, uint32_t seq, int answer) {
  if (cl_buf_reserve(&ch->out, CL_FRAME_HEADER + 9) != 0) return UV_ENOMEM;
  char *p = ch->out.data + ch->out.len;
  put_le32(p, 9);
  p[4] = (char)CL_FRAME_CONN;
  put_le32(p + 5, rr_id);
  put_le32(p + 9, seq);
  p[13] = (char)answer;
  ch->out.len += CL_FRAME_HEADER + 9;
  /* a flush already due this turn takes it along */
  if (answer != CL_CONN_ACCEPTED || ch->in_flush_list || ch->answers_held + 1 >= ANSWER_BATCH) {
    schedule_flush(ch);
  } else if (ch->answers_held++ == 0) {
    if (ch->answer_timer == NULL) {
      ch->answer_timer = malloc(sizeof *ch->answer_timer);
      if (ch->answer_timer == NULL) { ch->answers_held = 0; schedule_flush(ch); return 0; }
      uv_timer_init(cl_loop(), ch->answer_timer);
      uv_unref((uv_handle_t *)ch->answer_timer);
      ch->answer_timer->data = ch;
    }
    uv_timer_start(ch->answer_timer, on_answer_timer, ANSWER_DELAY_MS, 0);
  }
  return 0;
}

/* ch:answer(rr_id, seq, accepted): the worker's reply to a handed connection. (A unix
 * connection is marked as this process's own before its first read: see
 * handle_conn_frame.) */
static int ch_answer(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  uint32_t rr_id = (uint32_t)luaL_checkinteger(L, 2);
  uint32_t seq = (uint32_t)luaL_checkinteger(L, 3);
  int accepted = lua_toboolean(L, 4);
  if (queue_answer(ch, rr_id, seq, accepted ? CL_CONN_ACCEPTED : CL_CONN_REFUSED) != 0)
    return luaL_error(L, "answer: out of memory");
  return 0;
}

/* Writes `out` directly, waiting for room up to timeout ms each time the pipe is full;
 * whatever is written leaves `out`. True when all of it went. The caller makes sure
 * libuv holds no queued writes, which would have to go first. */
static int write_out_blocking(cl_channel *ch, int timeout) {
  uv_os_fd_t fd;
  uv_fileno(&ch->h.u.handle, &fd);
  size_t off = 0;
  while (off < ch->out.len) {
    uv_buf_t buf = uv_buf_init(ch->out.data + off, (unsigned)(ch->out.len - off));
    int n = uv_try_write(&ch->h.u.stream, &buf, 1);
    if (n > 0) { off += (size_t)n; continue; }
    if (n != UV_EAGAIN) break;
    struct pollfd pfd = { .fd = fd, .events = POLLOUT };
    if (poll(&pfd, 1, timeout) <= 0) break;
  }
  if (off > 0) memmove(ch->out.data, ch->out.data + off, ch->out.len - off);
  ch->out.len -= off;
  return ch->out.len == 0;
}

/* ch:flush_sync([timeout_ms]): writes what is pending now, blocking up to the timeout.
 * For exit paths only; gives up when libuv already holds queued writes. */
static int ch_flush_sync(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  lua_Integer ms = luaL_optinteger(L, 2, 1000);
  luaL_argcheck(L, ms >= 0 && ms <= INT_MAX, 2, "timeout out of range");
  if (uv_stream_get_write_queue_size(&ch->h.u.stream) != 0) { flush(ch, 0); lua_pushboolean(L, 0); return 1; }
  int done = write_out_blocking(ch, (int)ms);
  if (done) {
    int cbs = ch->out_cbs;
    ch->out_cbs = LUA_NOREF;
    release_answers(ch);
    unlink_flush(ch);
    run_write_cbs(L, cbs, 0);
  }
  lua_pushboolean(L, done);
  return 1;
}

/* At exit(3): os.exit() ends the process before the loop's next turn would write what
 * the script sent last (a worker's cluster.worker:send(m) followed by os.exit(3)). The
 * frames still in a channel's buffer are written here, up to a second's wait for each
 * (Node's pipe writes are synchronous, so its last message arrives too). No Lua runs:
 * the state may be closed already, and send callbacks are not called. Frames libuv
 * already queued stay unwritten, as do those after them. */
static void flush_channels_at_exit(void) {
  for (cl_channel *ch = flush_list; ch != NULL; ch = ch->next_pending) {
    if (ch->out.len > 0 && !cl_handle_is_closing(&ch->h)
        && uv_stream_get_write_queue_size(&ch->h.u.stream) == 0)
      write_out_blocking(ch, 1000);
  }
}

/* ---- receiving ---- */

static void report_close(cl_channel *ch, const char *why) {
  if (ch->closed_reported) return;
  ch->closed_reported = 1;
  lua_State *L = ch->h.L;
  if (cl_push_cb(&ch->h, CB_CLOSE)) {
    if (why) lua_pushstring(L, why); else lua_pushnil(L);
    cl_call(L, 1);
  }
}

/* The channel is gone: frames still waiting in `out` will never leave. Their send
 * callbacks get EPIPE, before the close is reported, as Node's do. */
static void drop_out(cl_channel *ch) {
  int cbs = ch->out_cbs;
  ch->out_cbs = LUA_NOREF;
  ch->out.len = 0;
  release_answers(ch);
  unlink_flush(ch);
  run_write_cbs(ch->h.L, cbs, UV_EPIPE);
}

static void fail_channel(cl_channel *ch, const char *why) {
  drop_out(ch);
  report_close(ch, why);
  if (!cl_handle_is_closing(&ch->h)) {
    uv_read_stop(&ch->h.u.stream);
    cl_handle_close(&ch->h);
  }
}

/* Accepts the next descriptor libuv holds for us into a handle of `type`, or of the
 * kind the kernel reports when type is UV_UNKNOWN_HANDLE (uv_pipe_pending_type costs
 * four system calls: isatty, fstat, getsockname, getsockopt). Pushes it and returns 1;
 * returns 0 when there is none. A descriptor of a kind we can't wrap fails the channel
 * (left pending, it would be paired with the next frame). Descriptors are accepted in
 * frame order, when their frame is read, so a handed connection's kind comes from it. */
static int accept_pending(cl_channel *ch, uv_handle_type type) {
  lua_State *L = ch->h.L;
  uv_pipe_t *pipe = &ch->h.u.pipe;
  while (uv_pipe_pending_count(pipe) > 0) {
    uv_handle_type t = type != UV_UNKNOWN_HANDLE ? type : uv_pipe_pending_type(pipe);
    uv_handle_t *client = cl_stream_new(L, t);
    if (client == NULL) {
      lua_pop(L, 1);
      fail_channel(ch, "received a descriptor of an unsupported kind");
      return 0;
    }
    if (uv_accept((uv_stream_t *)pipe, (uv_stream_t *)client) == 0) return 1;
    cl_handle_close(client->data);
    lua_pop(L, 1);
  }
  return 0;
}


/* A hand-off frame. Returns 0 when the channel failed. */
static int handle_conn_frame(cl_channel *ch, int flags, const char *p, uint32_t len) {
  lua_State *L = ch->h.L;
  if (!(flags & CL_FRAME_HANDLE)) {
    /* an answer, read by the master's round-robin distributor */
    if (len != 9 || (unsigned char)p[8] > CL_CONN_NO_DESCRIPTOR) { fail_channel(ch, "received a malformed connection answer"); return 0; }
    if (conn_answer_fn) conn_answer_fn(ch, get_le32(p), get_le32(p + 4), p[8]);
    return 1;
  }
  int kind = len >= 9 ? p[8] : 0;
  int family = len > 9 ? p[9] : 0;
  if ((kind != 1 && kind != 2) ||
      !(len == 9 || (kind == 1 && ((family == 4 && len == 10 + 2 * 6) || (family == 6 && len == 10 + 2 * 18))))) {
    fail_channel(ch, "received a malformed connection frame");
    return 0;
  }
  if (!accept_pending(ch, kind == 1 ? UV_TCP : UV_NAMED_PIPE)) {
    /* The kernel drops descriptors a process has no room for (and truncates the rest of
     * that message's): the master still holds the connection and hands it on. */
    if (cl_handle_is_closing(&ch->h)) return 0;
    return queue_answer(ch, get_le32(p), get_le32(p + 4), CL_CONN_NO_DESCRIPTOR) == 0;
  }
  if (kind == 2) {
    /* A unix socket keeps no byte counts: the master tells a connection this worker has
     * read from (served: nobody else can answer it) by a mark the first read sets, its
     * owner (F_SETOWN, in the open file both copies share; csrc/rr.c, was_served). Set
     * before the read, the mark never misses one; and a connection accepted but not yet
     * read when the worker dies carries none, and goes to another worker. */
    cl_handle *rh = cl_handle_test(L, -1);
    if (rh) rh->mark_on_read = 1;
  }
  if (!cl_push_cb(&ch->h, CB_CONN)) {
    /* nobody takes connections here: refuse, so the master hands it to another worker */
    cl_handle *rh = cl_handle_test(L, -1);
    if (rh && !cl_handle_is_closing(rh)) cl_handle_close(rh);
    lua_pop(L, 1);
    return queue_answer(ch, get_le32(p), get_le32(p + 4), CL_CONN_REFUSED) == 0;
  }
  lua_insert(L, -2);
  lua_pushinteger(L, get_le32(p));
  lua_pushinteger(L, get_le32(p + 4));
  lua_rotate(L, -3, -1); /* fn, rr_id, seq, handle */
  int nargs = 3;
  if (len > 9) {
    /* remote address, port, family, then local ones */
    struct sockaddr_storage ss;
    const char *a = p + 10;
    for (int i = 0; i < 2; i++) {
      memset(&ss, 0, sizeof ss);
      if (family == 4) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        memcpy(&in->sin_port, a, 2);
        memcpy(&in->sin_addr, a + 2, 4);
        a += 6;
      } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        memcpy(&in6->sin6_port, a, 2);
        memcpy(&in6->sin6_addr, a + 2, 16);
        a += 18;
      }
      cl_push_sockaddr_values(L, (struct sockaddr *)&ss);
    }
    nargs += 6;
  }
  cl_call(L, nargs);
  return 1;
}

/* decode_message(p, len) -> true, value | false, "malformed message: ..."; run under
 * lua_pcall, so that running out of memory while building a peer's message fails its
 * channel instead of unwinding through libuv. */
static int decode_message(lua_State *L) {
  const char *p = lua_touserdata(L, 1);
  size_t len = (size_t)lua_tointeger(L, 2);
  lua_settop(L, 0);
  int ok = cl_codec_decode(L, p, len) == 0; /* pushes the value, or the message */
  lua_pushboolean(L, ok);
  lua_insert(L, 1);
  return 2;
}

static void parse_frames(cl_channel *ch) {
  lua_State *L = ch->h.L;
  while (!cl_handle_is_closing(&ch->h)) {
    size_t avail = ch->in.len - ch->in_pos;
    if (avail < CL_FRAME_HEADER) break;
    const char *p = ch->in.data + ch->in_pos;
    uint32_t len = get_le32(p);
    int flags = (unsigned char)p[4];
    if (len > CL_MAX_MESSAGE || (flags & ~(CL_FRAME_INTERNAL | CL_FRAME_HANDLE | CL_FRAME_CONN | CL_FRAME_BEAT))) {
      fail_channel(ch, len > CL_MAX_MESSAGE ? "received a message over the size limit" : "received a malformed frame header");
      return;
    }
    if (avail < CL_FRAME_HEADER + (size_t)len) {
      if (cl_buf_reserve(&ch->in, CL_FRAME_HEADER + (size_t)len - avail) != 0)
        fail_channel(ch, "out of memory for an incoming message");
      break;
    }
    ch->in_pos += CL_FRAME_HEADER + len;
    if (flags & CL_FRAME_BEAT) {
      ch->last_beat = uv_now(cl_loop());
      ch->beats++;
      continue;
    }
    if (flags & CL_FRAME_CONN) {
      if (!handle_conn_frame(ch, flags, p + CL_FRAME_HEADER, len)) return;
      continue;
    }
    if (!cl_push_cb(&ch->h, CB_MESSAGE)) continue;
    lua_pushboolean(L, flags & CL_FRAME_INTERNAL);
    lua_pushcfunction(L, decode_message);
    lua_pushlightuserdata(L, (void *)(p + CL_FRAME_HEADER));
    lua_pushinteger(L, (lua_Integer)len);
    if (lua_pcall(L, 2, 2, 0) != LUA_OK) {
      lua_pop(L, 3);
      fail_channel(ch, "ran out of memory for a received message");
      return;
    }
    if (!lua_toboolean(L, -2)) {
      char msg[256];
      snprintf(msg, sizeof msg, "received a %s", lua_tostring(L, -1)); /* "malformed message: ..." */
      lua_pop(L, 4);
      fail_channel(ch, msg);
      return;
    }
    lua_remove(L, -2);
    if (flags & CL_FRAME_HANDLE) {
      if (!accept_pending(ch, UV_UNKNOWN_HANDLE)) {
        if (cl_handle_is_closing(&ch->h)) { lua_pop(L, 3); return; }
        /* The kernel drops the descriptors a process has no room for (EMFILE): the
         * message comes with false in the handle's place, and the channel goes on. */
        lua_pushboolean(L, 0);
      }
    } else {
      lua_pushnil(L);
    }
    cl_call(L, 3);
    /* `in` may have been reallocated by a nested read; p is not used after this. */
  }
  if (cl_handle_is_closing(&ch->h)) return;
  /* Descriptors come with the first bytes of the write that carries their frames (a
   * handle frame alone, or a batch of up to CL_CONN_BATCH_MAX hand-offs, which may
   * still be arriving), so once the complete frames took theirs, at most one batch's
   * can be waiting. More would pile up, and pair with the wrong frames: the peer breaks
   * the protocol. */
  if (uv_pipe_pending_count(&ch->h.u.pipe) > CL_CONN_BATCH_MAX) {
    fail_channel(ch, "received a descriptor that no message carries");
    return;
  }
  /* compact */
  if (ch->in_pos == ch->in.len) {
    ch->in.len = ch->in_pos = 0;
  } else if (ch->in_pos > 0 && ch->in_pos > ch->in.cap / 2) {
    memmove(ch->in.data, ch->in.data + ch->in_pos, ch->in.len - ch->in_pos);
    ch->in.len -= ch->in_pos;
    ch->in_pos = 0;
  }
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  cl_channel *ch = handle->data;
  (void)suggested;
  if (cl_buf_reserve(&ch->in, READ_CHUNK) != 0) { *buf = uv_buf_init(NULL, 0); return; }
  *buf = uv_buf_init(ch->in.data + ch->in.len, (unsigned)(ch->in.cap - ch->in.len));
}

/* Whether bytes wait in the channel's socket (FIONREAD: what the next reads would get). */
static int bytes_waiting(cl_channel *ch) {
  uv_os_fd_t fd;
  int n = 0;
  return uv_fileno(&ch->h.u.handle, &fd) == 0 && ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void restart_reading(cl_channel *ch) {
  ch->reread = 0;
  if (cl_handle_is_closing(&ch->h)) return;
  if (uv_read_start(&ch->h.u.stream, on_alloc, on_read) != 0) fail_channel(ch, NULL);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  cl_channel *ch = stream->data;
  (void)buf;
  if (nread > 0) {
    ch->in.len += (size_t)nread;
    parse_frames(ch);
    return;
  }
  if (nread == 0) return;
  if (nread == UV_EOF && bytes_waiting(ch)) {
    /* Not the end yet. libuv takes a read shorter than its buffer, on a socket whose
     * peer has hung up, for the last one (its POLLHUP short cut; libuv/libuv#4992),
     * but recvmsg stops after each message that carries descriptors: the frames the
     * peer wrote after a handle, just before it closed (a message, its disconnect),
     * are still there. Reading starts again next turn: not from here, as libuv marks
     * the stream not reading once this returns. */
    ch->reread = 1;
    schedule_flush(ch);
    return;
  }
  if (nread == UV_EOF || nread == UV_ECONNRESET || nread == UV_EPIPE) {
    /* the other side closed; a reset only means it left with bytes unread */
    fail_channel(ch, NULL);
  } else if (nread == UV_ENOBUFS) {
    fail_channel(ch, "out of memory reading the channel");
  } else {
    char text[128];
    fail_channel(ch, uv_strerror_r((int)nread, text, sizeof text));
  }
}

/* ch:start(on_message(internal, value, handle), on_close(reason|nil)); handle is nil for
 * a message without one, false for one whose descriptor the kernel dropped */
static int ch_start(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  cl_set_cb(L, &ch->h, CB_MESSAGE, 2);
  cl_set_cb(L, &ch->h, CB_CLOSE, 3);
  if (!ch->reading) {
    int err = uv_read_start(&ch->h.u.stream, on_alloc, on_read);
    if (err) return cl_push_fail(L, err, "read");
    ch->reading = 1;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static void on_beat(uv_timer_t *t) {
  (void)t;
  cl_channel *ch = beat_channel;
  if (ch == NULL || cl_handle_is_closing(&ch->h)) return;
  if (cl_buf_reserve(&ch->out, CL_FRAME_HEADER) != 0) return;
  char *p = ch->out.data + ch->out.len;
  put_le32(p, 0);
  p[4] = (char)CL_FRAME_BEAT;
  ch->out.len += CL_FRAME_HEADER;
  schedule_flush(ch);
}

/* ch:heartbeat(interval_ms): the worker beats every interval from its loop (0 stops).
 * The timer does not keep the worker alive. */
static int ch_heartbeat(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  lua_Integer ms = luaL_checkinteger(L, 2);
  if (!beat_timer_ready) {
    uv_timer_init(cl_loop(), &beat_timer);
    uv_unref((uv_handle_t *)&beat_timer);
    beat_timer_ready = 1;
  }
  uv_timer_stop(&beat_timer);
  beat_channel = ms > 0 ? ch : NULL;
  if (ms > 0) uv_timer_start(&beat_timer, on_beat, 0, (uint64_t)ms);
  return 0;
}

/* ch:last_beat() -> loop time in ms of the last heartbeat (0: none yet), beats so far */
static int ch_last_beat(lua_State *L) {
  cl_handle **box = luaL_checkudata(L, 1, TNAME);
  cl_channel *ch = (cl_channel *)*box;
  lua_pushinteger(L, ch ? (lua_Integer)ch->last_beat : 0);
  lua_pushinteger(L, ch ? (lua_Integer)ch->beats : 0);
  return 2;
}

/* ch:on_connection(fn(rr_id, seq, handle)): the worker's receiver of handed connections. */
static int ch_on_connection(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  cl_set_cb(L, &ch->h, CB_CONN, 2);
  return 0;
}

/* ch:close(): closes now; pending frames not yet written are flushed first. */
static int ch_close(lua_State *L) {
  cl_handle **box = luaL_checkudata(L, 1, TNAME);
  cl_channel *ch = (cl_channel *)*box;
  if (ch == NULL || cl_handle_is_closing(&ch->h)) return 0;
  flush(ch, 0);
  unlink_flush(ch);
  ch->closed_reported = 1; /* a close we asked for is not reported back */
  return cl_handle_close_method(L);
}

static int ch_pending(lua_State *L) {
  cl_channel *ch = check_channel(L, 1);
  lua_pushinteger(L, (lua_Integer)(ch->out.len + uv_stream_get_write_queue_size(&ch->h.u.stream)));
  return 1;
}

static void on_answer_timer_closed(uv_handle_t *t) { free(t); }

static void channel_free(cl_handle *h) {
  cl_channel *ch = (cl_channel *)h;
  lua_State *L = h->L;
  if (ch->answer_timer) uv_close((uv_handle_t *)ch->answer_timer, on_answer_timer_closed);
  if (beat_channel == ch) {
    uv_timer_stop(&beat_timer);
    beat_channel = NULL;
  }
  unlink_flush(ch);
  cl_buf_free(&ch->in);
  cl_buf_free(&ch->out);
  luaL_unref(L, LUA_REGISTRYINDEX, ch->out_cbs);
  /* (descriptors received and not yet accepted are closed by libuv with the pipe) */
}

cl_channel *cl_channel_push_new(lua_State *L) {
  cl_channel *ch = (cl_channel *)cl_handle_new(L, sizeof(cl_channel), TNAME);
  uv_pipe_init(cl_loop(), &ch->h.u.pipe, 1);
  ch->h.on_free = channel_free;
  ch->out_cbs = LUA_NOREF;
  return ch;
}

uv_pipe_t *cl_channel_pipe(cl_channel *ch) { return &ch->h.u.pipe; }

cl_channel *cl_channel_test(lua_State *L, int idx) {
  cl_handle **box = luaL_testudata(L, idx, TNAME);
  if (box == NULL || *box == NULL || cl_handle_is_closing(*box)) return NULL;
  return (cl_channel *)*box;
}

int cl_channel_is_open(cl_channel *ch) { return !cl_handle_is_closing(&ch->h); }

/* core.channel_open(fd) -> channel: the worker's end, inherited from the master. */
static int l_channel_open(lua_State *L) {
  int fd = (int)luaL_checkinteger(L, 1);
  /* the worker's own children must not inherit the channel to its master */
  int fdflags = fcntl(fd, F_GETFD);
  if (fdflags >= 0) fcntl(fd, F_SETFD, fdflags | FD_CLOEXEC);
  cl_channel *ch = cl_channel_push_new(L);
  int err = uv_pipe_open(&ch->h.u.pipe, fd);
  if (err) {
    cl_handle_close(&ch->h);
    return cl_push_fail(L, err, "channel_open");
  }
  return 1;
}

void cl_open_channel(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"start", ch_start}, {"send", ch_send}, {"flush_sync", ch_flush_sync},
    {"close", ch_close}, {"pending", ch_pending}, {"answer", ch_answer},
    {"on_connection", ch_on_connection}, {"heartbeat", ch_heartbeat},
    {"last_beat", ch_last_beat},
    {"ref", cl_handle_ref_method}, {"unref", cl_handle_unref_method},
    {"fileno", cl_handle_fileno_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  cl_set_mark(L, TNAME, &CHANNEL_MARK);
  static int exit_flush_registered = 0;
  if (!exit_flush_registered && atexit(flush_channels_at_exit) == 0) exit_flush_registered = 1;
  lua_pushcfunction(L, l_channel_open);
  lua_setfield(L, -2, "channel_open");
  lua_pushinteger(L, SEND_BACKLOG_LIMIT);
  lua_setfield(L, -2, "SEND_BACKLOG_LIMIT");
}
