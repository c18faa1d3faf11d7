/* Shared plumbing for the C core: handle lifetime, callbacks, errors, buffers.
 * Every other csrc/ file includes this; nothing here is specific to one concept. */
#ifndef CLUSTER_UTIL_H
#define CLUSTER_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <lua.h>
#include <lauxlib.h>

/* Largest message payload a channel sends or accepts (documented in the README). */
#define CL_MAX_MESSAGE (64u * 1024u * 1024u)

/* The one loop of the process. */
uv_loop_t *cl_loop(void);
/* How many poll phases the loop has begun (a count kept by loop.c): libuv adds
 * descriptors to epoll only as a poll phase begins, so a handle made in the current
 * phase has never been added. */
unsigned long cl_poll_phase(void);

/* Whether the running libuv is one whose internals the core was read against (1.30 to
 * 1.44 on Linux), for the two places that use them: closing a socket without libuv's
 * epoll delete (cl_handle_close) and accepting with the peer's address (accept.c). */
int cl_libuv_internals_known(void);

/* ---- accepting with the peer's address (accept.c) ----
 * Makes a listening TCP stream accept with its peers' addresses (after uv_listen). */
void cl_accept_with_peer(uv_tcp_t *server);
/* The address of the peer of the connection `server` holds for uv_accept, when it was
 * accepted that way; NULL otherwise (ask the kernel). Valid until that uv_accept. */
const struct sockaddr *cl_accepted_peer(uv_tcp_t *server);

/* ---- growable byte buffer (malloc'ed) ---- */
typedef struct cl_buf {
  char *data;
  size_t len, cap;
} cl_buf;

/* Makes room for n more bytes; returns 0 or -1 when out of memory. */
int cl_buf_reserve(cl_buf *b, size_t n);
int cl_buf_append(cl_buf *b, const void *p, size_t n);
void cl_buf_free(cl_buf *b);

/* ---- handles ----
 * A libuv handle lives in malloc'ed memory (libuv may outlive the GC); the Lua
 * userdata holds only a pointer to it (luv's handle.c). While the handle is open
 * the userdata is pinned by a registry ref (self_ref) and released in the close
 * callback, where the memory is freed and the userdata's pointer set to NULL. */
#define CL_MAX_CBS 4

typedef struct cl_handle {
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
    uv_udp_t udp;
    uv_timer_t timer;
    uv_idle_t idle;
    uv_process_t process;
    uv_signal_t signal;
    uv_poll_t poll;
  } u;
  lua_State *L;
  struct cl_handle **box;  /* the userdata's pointer slot */
  int self_ref;            /* registry ref pinning the userdata while open */
  int cbs[CL_MAX_CBS];     /* registry refs of Lua callbacks, LUA_NOREF if none */
  int close_ref;           /* callback for close, LUA_NOREF if none */
  int read_with_owner;     /* a stream's read callback takes its owner first */
  int mark_on_read;        /* a handed unix connection: marked as ours before its first read */
  void (*on_free)(struct cl_handle *); /* type-specific cleanup before free, may be NULL */
  unsigned long born;      /* cl_poll_phase() when it was made (see cl_handle_close) */
  int alone;               /* a stream whose file only this process holds (see cl_handle_close) */
  struct cl_handle *soon_next; /* a stream queued to read at the end of the turn (stream.c) */
  int soon_queued;
  char *held;              /* a stream's bytes written this turn, not yet sent (stream.c) */
  size_t held_len, held_cap;
  struct cl_handle *held_prev, *held_next; /* the streams holding bytes */
  int close_error;         /* why sending the held bytes at the close failed, or 0 */
  /* Sends what the handle holds back, before anything that must come after it:
   * `closing` when the handle is about to close (cl_handle_close). May be NULL. */
  void (*flush)(struct cl_handle *, int closing);
} cl_handle;

/* Allocates `size` bytes (>= sizeof(cl_handle), the concept's struct starting with a
 * cl_handle), pushes a userdata with metatable `tname`, pins it. The uv handle itself
 * must still be initialised by the caller (uv_*_init) with data = the cl_handle. */
cl_handle *cl_handle_new(lua_State *L, size_t size, const char *tname);
/* Checks that idx is a userdata of type tname and open; raises otherwise. */
cl_handle *cl_handle_check(lua_State *L, int idx, const char *tname);
/* Same without type check: any cluster handle type (for fd passing). NULL if not one. */
cl_handle *cl_handle_test(lua_State *L, int idx);
/* Registers metatable tname with methods (luaL_Reg, __index = methods) and the common
 * metamethods __close and __tostring (no __gc: see util.c); marks it as a cluster
 * handle type. */
void cl_handle_register(lua_State *L, const char *tname, const luaL_Reg *methods);
/* Marks: cl_set_mark gives metatable tname the mark `mark` (any address, one per
 * concept); cl_has_mark tells whether the value at idx has a metatable with that mark.
 * Cheaper than luaL_testudata, which looks tname up in the registry by string. */
void cl_set_mark(lua_State *L, const char *tname, const void *mark);
int cl_has_mark(lua_State *L, int idx, const void *mark);
/* The open handle at idx, whose metatable carries `mark`; else raises a type error
 * naming `expected`, or an argument error for a closed handle. */
cl_handle *cl_check_marked(lua_State *L, int idx, const void *mark, const char *expected);
/* Starts closing; the close callback frees everything. Safe to call twice. A stream's
 * held bytes are sent first (flush); if that fails, the close callback gets the error
 * after the owner. */
void cl_handle_close(cl_handle *h);
/* Sends what a handle holds back (a stream's writes of this turn), if anything: before
 * its descriptor is given away (channel.c, fileno). */
void cl_handle_flush(cl_handle *h);
int cl_handle_is_closing(cl_handle *h);
/* A handle's owner: the Lua object wrapping it (a net Socket), kept in the userdata's
 * user value and passed first to the callbacks that were given it, so that the Lua
 * side needs no closure per handle. cl_set_owner stores the value at owner_idx for the
 * handle userdata at handle_idx; cl_push_owner_ref pushes the owner (or nil) of the
 * handle pinned by self_ref. */
void cl_set_owner(lua_State *L, int handle_idx, int owner_idx);
void cl_push_owner_ref(lua_State *L, int self_ref);
/* The generic Lua method h:close([cb[, owner]]) for any handle type: cb(owner) once
 * closed (owner nil unless given here or before, e.g. to stream:read_start). */
int cl_handle_close_method(lua_State *L);
/* h:ref() / h:unref() / h:fileno() common methods. */
int cl_handle_ref_method(lua_State *L);
int cl_handle_unref_method(lua_State *L);
int cl_handle_fileno_method(lua_State *L);

/* Stores the function at idx (or nil) in slot `slot` of h. */
void cl_set_cb(lua_State *L, cl_handle *h, int slot, int idx);
/* Pushes the callback in slot; returns 0 (pushing nothing) when none. */
int cl_push_cb(cl_handle *h, int slot);

/* Calls the function below nargs arguments on the stack in protected mode with a
 * traceback. On error the error is kept, the loop stops, and run()/poll() re-raise it.
 * Returns 0 on success, -1 on error. Pops function and arguments; pushes nothing. */
int cl_call(lua_State *L, int nargs);
/* While the loop runs, the message handler cl_call uses sits in one stack slot: pushes
 * it (returning what to give cl_pop_handler) ... */
int cl_push_handler(lua_State *L);
/* ... and, once the run is over, forgets it (the caller pops the slot). */
void cl_pop_handler(int previous);
/* Pending error (from a callback) to re-raise: pushes it and returns 1, else 0. */
int cl_take_error(lua_State *L);

/* luv's triple for operational failure: pushes nil, "<syscall> <ERRNAME>: <strerror>", ERRNAME; returns 3. */
int cl_push_fail(lua_State *L, int uverr, const char *what);
/* Pushes a contract error object {code=, errno=, syscall=, message=} (metatable with __tostring). */
void cl_push_error_object(lua_State *L, int uverr, const char *syscall, const char *detail);

/* Signal names <-> numbers. Returns -1 / NULL when unknown. */
int cl_signal_number(const char *name);
const char *cl_signal_name(int signum);
/* The signal named ("SIGTERM", "TERM") or numbered at idx, or -1. */
int cl_to_signal(lua_State *L, int idx);
/* The same, raising naming fname/arg when it is none. */
int cl_check_signal(lua_State *L, int idx, const char *fname);

/* Per-concept openers: each adds its functions to the table at the top of the stack. */
void cl_open_alloc(lua_State *L);
void cl_open_loop(lua_State *L);
void cl_open_timer(lua_State *L);
void cl_open_idle(lua_State *L);
void cl_open_codec(lua_State *L);
void cl_open_process(lua_State *L);
void cl_open_channel(lua_State *L);
void cl_open_signal(lua_State *L);
void cl_open_stream(lua_State *L);
void cl_open_udp(lua_State *L);
void cl_open_tty(lua_State *L);
void cl_open_sys(lua_State *L);
void cl_open_rr(lua_State *L);

#endif
