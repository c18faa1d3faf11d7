/* Shared plumbing: buffers, handle lifetime, protected callbacks, errors, signals. */
#include "util.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int pending_error_ref = LUA_NOREF;

uv_loop_t *cl_loop(void) { return uv_default_loop(); }

/* ---- buffers ---- */

int cl_buf_reserve(cl_buf *b, size_t n) {
  if (b->cap - b->len >= n) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap - b->len < n) {
    if (cap > SIZE_MAX / 2) return -1;
    cap *= 2;
  }
  char *p = realloc(b->data, cap);
  if (p == NULL) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

int cl_buf_append(cl_buf *b, const void *p, size_t n) {
  if (cl_buf_reserve(b, n) != 0) return -1;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

void cl_buf_free(cl_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* ---- handles ---- */

cl_handle *cl_handle_new(lua_State *L, size_t size, const char *tname) {
  cl_handle *h = calloc(1, size);
  if (h == NULL) luaL_error(L, "out of memory");
  cl_handle **box = lua_newuserdatauv(L, sizeof *box, 1);
  *box = h;
  luaL_setmetatable(L, tname);
  h->L = L;
  h->box = box;
  for (int i = 0; i < CL_MAX_CBS; i++) h->cbs[i] = LUA_NOREF;
  h->close_ref = LUA_NOREF;
  lua_pushvalue(L, -1);
  h->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  h->u.handle.data = h;
  h->born = cl_poll_phase();
  return h;
}

/* Every handle metatable carries HANDLE_MARK: it tells a cluster handle from any other
 * userdata. */
static const char HANDLE_MARK = 0;

/* The marks, as (mark, metatable) pairs: a metatable lives in the registry for good
 * and never moves, so its address identifies it. Checking a value is then a metatable
 * fetch and a few pointer compares, with no table lookup (every stream method checks
 * its handle: several times per connection). */
#define MAX_MARKED 64
static struct { const void *mark, *metatable; } marked[MAX_MARKED];
static int n_marked = 0;

int cl_has_mark(lua_State *L, int idx, const void *mark) {
  static int last = 0; /* the pair found last: the same check comes again and again */
  if (!lua_getmetatable(L, idx)) return 0;
  const void *mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  if (marked[last].metatable == mt && marked[last].mark == mark) return 1;
  for (int i = 0; i < n_marked; i++)
    if (marked[i].metatable == mt && marked[i].mark == mark) { last = i; return 1; }
  return 0;
}

void cl_set_mark(lua_State *L, const char *tname, const void *mark) {
  luaL_getmetatable(L, tname);
  const void *mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  for (int i = 0; i < n_marked; i++)
    if (marked[i].metatable == mt && marked[i].mark == mark) return;
  if (n_marked == MAX_MARKED) luaL_error(L, "cl_set_mark: more than %d marks", MAX_MARKED);
  marked[n_marked].mark = mark;
  marked[n_marked].metatable = mt;
  n_marked++;
}

cl_handle *cl_check_marked(lua_State *L, int idx, const void *mark, const char *expected) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !cl_has_mark(L, idx, mark)) luaL_typeerror(L, idx, expected);
  cl_handle *h = *(cl_handle **)lua_touserdata(L, idx);
  if (h == NULL || cl_handle_is_closing(h)) luaL_argerror(L, idx, "handle is closed");
  return h;
}

static int is_handle_type(lua_State *L, int idx) {
  return cl_has_mark(L, idx, &HANDLE_MARK);
}

cl_handle *cl_handle_test(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !is_handle_type(L, idx)) return NULL;
  cl_handle **box = lua_touserdata(L, idx);
  return *box;
}

cl_handle *cl_handle_check(lua_State *L, int idx, const char *tname) {
  cl_handle **box = luaL_checkudata(L, idx, tname);
  if (*box == NULL || cl_handle_is_closing(*box))
    luaL_argerror(L, idx, "handle is closed");
  return *box;
}

int cl_handle_is_closing(cl_handle *h) {
  return uv_is_closing(&h->u.handle);
}

/* Callback references. A few functions are the callbacks of every handle of a kind (a
 * net socket's read callback, its close callback): their registry references are
 * shared and counted, instead of a luaL_ref and a luaL_unref per handle (some 500
 * instructions a connection each). The first SHARED_REFS functions that want one get a
 * slot and keep it while a handle holds them; any other gets a reference of its own.
 * (The core serves one Lua state: its handles' and its loop's.) */
#define SHARED_REFS 8
static struct {
  const void *fn; /* the function (lua_topointer), while count > 0 */
  int ref;
  unsigned count;
} shared_refs[SHARED_REFS];

/* A registry reference to the function at idx. */
static int ref_callback(lua_State *L, int idx) {
  const void *fn = lua_topointer(L, idx);
  int free_slot = -1;
  for (int i = 0; i < SHARED_REFS; i++) {
    if (shared_refs[i].count == 0) {
      if (free_slot < 0) free_slot = i;
    } else if (shared_refs[i].fn == fn) {
      shared_refs[i].count++;
      return shared_refs[i].ref;
    }
  }
  lua_pushvalue(L, idx);
  int ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (free_slot >= 0) {
    shared_refs[free_slot].fn = fn;
    shared_refs[free_slot].ref = ref;
    shared_refs[free_slot].count = 1;
  }
  return ref;
}

static void unref_callback(lua_State *L, int ref) {
  if (ref == LUA_NOREF || ref == LUA_REFNIL) return;
  for (int i = 0; i < SHARED_REFS; i++) {
    if (shared_refs[i].count > 0 && shared_refs[i].ref == ref) {
      if (--shared_refs[i].count > 0) return;
      shared_refs[i].fn = NULL;
      break;
    }
  }
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
}

static void on_handle_closed(uv_handle_t *uvh) {
  cl_handle *h = uvh->data;
  lua_State *L = h->L;
  if (h->on_free) h->on_free(h);
  int close_ref = h->close_ref;
  for (int i = 0; i < CL_MAX_CBS; i++) unref_callback(L, h->cbs[i]);
  *h->box = NULL;
  int self_ref = h->self_ref;
  int close_error = h->close_error;
  free(h);
  if (close_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, close_ref);
    unref_callback(L, close_ref);
    cl_push_owner_ref(L, self_ref);
    if (close_error) cl_push_error_object(L, close_error, "write", NULL);
    cl_call(L, close_error ? 2 : 1);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, self_ref);
}

void cl_set_owner(lua_State *L, int handle_idx, int owner_idx) {
  lua_pushvalue(L, owner_idx);
  lua_setiuservalue(L, handle_idx, 1);
}

void cl_push_owner_ref(lua_State *L, int self_ref) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, self_ref);
  lua_getiuservalue(L, -1, 1);
  lua_remove(L, -2);
}

int cl_libuv_internals_known(void) {
#if UV_VERSION_MAJOR == 1 && UV_VERSION_MINOR >= 30 && UV_VERSION_MINOR < 45 && defined(__linux__)
  static int known = -1;
  if (known < 0) {
    unsigned v = uv_version();
    known = v >= 0x011e00 && v < 0x012d00;
  }
  return known;
#else
  return 0;
#endif
}

/* libuv closes a socket's descriptor with an EPOLL_CTL_DEL first, whether or not it
 * ever added it to epoll, and whether or not the kernel would drop it by itself. Two
 * kinds of stream need no DEL, and it is one system call per connection:
 * - One made in the current poll phase (a round-robin hand-off, an accept whose
 *   request was there at once, answered and closed in the turn it arrived): libuv adds
 *   descriptors only as a poll phase begins (uv__io_poll), so it was never in the set,
 *   and its DEL fails (ENOENT).
 * - One whose file this process alone holds (`alone`: accepted here, never sent over a
 *   channel nor given out by fileno(), and not fd 0-2, which a spawned worker
 *   inherits). The kernel removes a file's epoll registrations when its last
 *   descriptor closes, which is what libuv's close does next. libuv's DEL is for a file
 *   that lives on in another process and would go on waking this loop; every socket
 *   here is close-on-exec, and uv_spawn returns only once the child has exec'd.
 * libuv tests the loop's backend descriptor before that DEL (for a loop being torn
 * down); hiding it for the length of uv_close skips the call and nothing else
 * (uv_close touches the backend descriptor nowhere else; the events already fetched
 * for the descriptor are still invalidated). libuv 1.45 moved epoll_ctl onto io_uring
 * batches and dropped that test, so only the versions before it, that this was read
 * against, get it (cl_libuv_internals_known). */
static int needs_no_del(cl_handle *h) {
  uv_handle_type t = h->u.handle.type;
  if ((t != UV_TCP && t != UV_NAMED_PIPE) || !cl_libuv_internals_known()) return 0;
  if (h->born == cl_poll_phase()) return 1;
  uv_os_fd_t fd;
  return h->alone && uv_fileno(&h->u.handle, &fd) == 0 && fd > 2;
}

void cl_handle_flush(cl_handle *h) {
  if (h->flush) h->flush(h, 0);
}

void cl_handle_close(cl_handle *h) {
  if (uv_is_closing(&h->u.handle)) return;
  if (h->flush) h->flush(h, 1);
  if (needs_no_del(h)) {
    uv_loop_t *loop = h->u.handle.loop;
    int backend = loop->backend_fd;
    loop->backend_fd = -1;
    uv_close(&h->u.handle, on_handle_closed);
    loop->backend_fd = backend;
    return;
  }
  uv_close(&h->u.handle, on_handle_closed);
}

int cl_handle_close_method(lua_State *L) {
  luaL_argcheck(L, lua_type(L, 1) == LUA_TUSERDATA && is_handle_type(L, 1), 1,
                "expected a cluster handle");
  cl_handle *h = *(cl_handle **)lua_touserdata(L, 1);
  if (h == NULL || cl_handle_is_closing(h)) return 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!lua_isnoneornil(L, 3)) cl_set_owner(L, 1, 3);
    h->close_ref = ref_callback(L, 2);
  }
  cl_handle_close(h);
  return 0;
}

/* __close(h, err): a to-be-closed variable's handle, closed however its scope ends
 * (the error, if any, is not a close callback). */
static int handle_close_metamethod(lua_State *L) {
  lua_settop(L, 1);
  return cl_handle_close_method(L);
}

static cl_handle *check_any(lua_State *L) {
  cl_handle *h = cl_handle_test(L, 1);
  luaL_argcheck(L, h != NULL, 1, "expected an open cluster handle");
  return h;
}

int cl_handle_ref_method(lua_State *L) { uv_ref(&check_any(L)->u.handle); return 0; }
int cl_handle_unref_method(lua_State *L) { uv_unref(&check_any(L)->u.handle); return 0; }
int cl_handle_fileno_method(lua_State *L) {
  uv_os_fd_t fd;
  cl_handle *h = check_any(L);
  int err = uv_fileno(&h->u.handle, &fd);
  if (err) return cl_push_fail(L, err, "fileno");
  h->alone = 0; /* whoever asked may share it */
  cl_handle_flush(h); /* (and may read or write it: what was written comes first) */
  lua_pushinteger(L, fd);
  return 1;
}

static int handle_tostring(lua_State *L) {
  luaL_argcheck(L, lua_type(L, 1) == LUA_TUSERDATA && is_handle_type(L, 1), 1, "expected a cluster handle");
  cl_handle **box = lua_touserdata(L, 1);
  luaL_getmetafield(L, 1, "__name");
  lua_pushfstring(L, "%s: %p%s", lua_tostring(L, -1), (void *)*box, *box ? "" : " (closed)");
  return 1;
}

void cl_handle_register(lua_State *L, const char *tname, const luaL_Reg *methods) {
  luaL_newmetatable(L, tname);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  /* No __gc: open handles are pinned, so a collected userdata is closed already (or
   * the state is closing at exit, when the loop will not run again), and there would
   * be nothing to do. A finalizer would cost every connection's handle much more than
   * nothing: the collector keeps such objects on a list of their own, calls each one's
   * in a protected call, and frees them only a cycle later. */
  lua_pushcfunction(L, handle_close_metamethod);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, handle_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
  cl_set_mark(L, tname, &HANDLE_MARK);
}

/* ---- callbacks ---- */

void cl_set_cb(lua_State *L, cl_handle *h, int slot, int idx) {
  if (!lua_isnoneornil(L, idx)) luaL_checktype(L, idx, LUA_TFUNCTION);
  unref_callback(L, h->cbs[slot]);
  h->cbs[slot] = LUA_NOREF;
  if (!lua_isnoneornil(L, idx)) h->cbs[slot] = ref_callback(L, idx);
}

int cl_push_cb(cl_handle *h, int slot) {
  if (h->cbs[slot] == LUA_NOREF) return 0;
  lua_rawgeti(h->L, LUA_REGISTRYINDEX, h->cbs[slot]);
  return 1;
}

/* The message handler of callbacks: a string gets the traceback appended, as lua.c's
 * does. A table (an error object) stays the same object, so that whoever catches it
 * from run() can read its fields; it gets the traceback as its field `traceback` (as
 * Node's errors carry `stack`) unless it has one. */
static int traceback(lua_State *L) {
  if (lua_type(L, 1) == LUA_TTABLE) {
    lua_settop(L, 1);
    lua_pushliteral(L, "traceback");
    if (lua_rawget(L, 1) == LUA_TNIL) { /* (raw: no metamethod may run, nor raise, here) */
      lua_pushliteral(L, "traceback");
      luaL_traceback(L, L, NULL, 1);
      lua_rawset(L, 1);
    }
    lua_settop(L, 1);
    return 1;
  }
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL && !lua_isnoneornil(L, 1)) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* A stack slot holding `traceback` while the loop runs (cl_push_handler), or 0. A
 * callback's pcall then names that slot as its message handler, instead of inserting
 * the handler under the function and removing it after (two stack rotations per
 * callback). A callback reached from a nested C call sees another frame, where that
 * index may hold anything: the slot is used only when it lies below the function and
 * holds `traceback` (any slot that does is a valid handler). */
static int handler_slot = 0;

int cl_push_handler(lua_State *L) {
  lua_pushcfunction(L, traceback);
  int previous = handler_slot;
  handler_slot = lua_gettop(L);
  return previous;
}

void cl_pop_handler(int previous) {
  handler_slot = previous;
}

int cl_call(lua_State *L, int nargs) {
  int base = lua_gettop(L) - nargs; /* the function */
  int handler = handler_slot;
  int inserted = !(handler > 0 && handler < base && lua_tocfunction(L, handler) == traceback);
  if (inserted) {
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    handler = base;
  }
  int rc = lua_pcall(L, nargs, 0, handler);
  if (rc == LUA_OK) {
    if (inserted) lua_remove(L, base);
    return 0;
  }
  /* errors queue in order; run()/poll() re-raise one per call, so none is lost */
  if (pending_error_ref == LUA_NOREF) {
    lua_newtable(L);
    pending_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, pending_error_ref);
  lua_insert(L, -2);
  lua_rawseti(L, -2, luaL_len(L, -2) + 1);
  lua_pop(L, 1);
  if (inserted) lua_remove(L, base);
  uv_stop(cl_loop());
  return -1;
}

int cl_take_error(lua_State *L) {
  if (pending_error_ref == LUA_NOREF) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, pending_error_ref);
  lua_Integer n = luaL_len(L, -1);
  if (n == 0) { lua_pop(L, 1); return 0; }
  lua_rawgeti(L, -1, 1);
  /* shift the rest down */
  for (lua_Integer i = 1; i < n; i++) {
    lua_rawgeti(L, -2, i + 1);
    lua_rawseti(L, -3, i);
  }
  lua_pushnil(L);
  lua_rawseti(L, -3, n);
  lua_remove(L, -2);
  return 1;
}

/* ---- errors ---- */

/* libuv's name and text of an error, in the caller's buffers (uv_err_name and
 * uv_strerror leak a string for a code they do not know). */
typedef struct { char name[48], text[128]; } err_words;
static void describe(int uverr, err_words *w) {
  uv_err_name_r(uverr, w->name, sizeof w->name);
  uv_strerror_r(uverr, w->text, sizeof w->text);
}

int cl_push_fail(lua_State *L, int uverr, const char *what) {
  err_words w;
  describe(uverr, &w);
  lua_pushnil(L);
  if (what)
    lua_pushfstring(L, "%s %s: %s", what, w.name, w.text);
  else
    lua_pushfstring(L, "%s: %s", w.name, w.text);
  lua_pushstring(L, w.name);
  return 3;
}

static int error_tostring(lua_State *L) {
  lua_getfield(L, 1, "message");
  return 1;
}

void cl_push_error_object(lua_State *L, int uverr, const char *syscall, const char *detail) {
  err_words w;
  describe(uverr, &w);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, w.name);
  lua_setfield(L, -2, "code");
  lua_pushinteger(L, uverr);
  lua_setfield(L, -2, "errno");
  lua_pushstring(L, syscall);
  lua_setfield(L, -2, "syscall");
  if (detail && *detail)
    lua_pushfstring(L, "%s %s %s", syscall, w.name, detail);
  else
    lua_pushfstring(L, "%s %s", syscall, w.name);
  lua_setfield(L, -2, "message");
  if (luaL_newmetatable(L, "cluster.error")) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_setmetatable(L, -2);
}

/* ---- signals ---- */

static const struct { const char *name; int num; } SIGNALS[] = {
  {"SIGHUP", SIGHUP}, {"SIGINT", SIGINT}, {"SIGQUIT", SIGQUIT}, {"SIGILL", SIGILL},
  {"SIGTRAP", SIGTRAP}, {"SIGABRT", SIGABRT}, {"SIGBUS", SIGBUS}, {"SIGFPE", SIGFPE},
  {"SIGKILL", SIGKILL}, {"SIGUSR1", SIGUSR1}, {"SIGSEGV", SIGSEGV}, {"SIGUSR2", SIGUSR2},
  {"SIGPIPE", SIGPIPE}, {"SIGALRM", SIGALRM}, {"SIGTERM", SIGTERM}, {"SIGCHLD", SIGCHLD},
  {"SIGCONT", SIGCONT}, {"SIGSTOP", SIGSTOP}, {"SIGTSTP", SIGTSTP}, {"SIGTTIN", SIGTTIN},
  {"SIGTTOU", SIGTTOU}, {"SIGURG", SIGURG}, {"SIGXCPU", SIGXCPU}, {"SIGXFSZ", SIGXFSZ},
  {"SIGVTALRM", SIGVTALRM}, {"SIGPROF", SIGPROF}, {"SIGWINCH", SIGWINCH}, {"SIGIO", SIGIO},
  {"SIGPWR", SIGPWR}, {"SIGSYS", SIGSYS},
};

int cl_signal_number(const char *name) {
  for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++) {
    if (strcasecmp(name, SIGNALS[i].name) == 0 || strcasecmp(name, SIGNALS[i].name + 3) == 0)
      return SIGNALS[i].num;
  }
  return -1;
}

const char *cl_signal_name(int signum) {
  for (size_t i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++)
    if (SIGNALS[i].num == signum) return SIGNALS[i].name;
  return NULL;
}

int cl_to_signal(lua_State *L, int idx) {
  if (lua_isinteger(L, idx)) {
    lua_Integer n = lua_tointeger(L, idx);
    return n >= 0 && n < 65 ? (int)n : -1;
  }
  if (lua_type(L, idx) == LUA_TSTRING) return cl_signal_number(lua_tostring(L, idx));
  return -1;
}

int cl_check_signal(lua_State *L, int idx, const char *fname) {
  int sig = cl_to_signal(L, idx);
  if (sig >= 0) return sig;
  return luaL_error(L, "%s: bad argument #%d (signal): expected a signal name such as \"SIGTERM\" or a number, got %s",
                    fname, idx, lua_type(L, idx) == LUA_TSTRING ? lua_tostring(L, idx) : luaL_typename(L, idx));
}
