/* The event loop, run in the caller's thread: run / poll / stop, and the clock. */
#include "util.h"
#include "stream.h"

#include <signal.h>
#include <string.h>

static int stop_requested = 0;
static int running = 0; /* inside uv_run: libuv's loop is not reentrant */

/* Raises when called from a callback of the loop that is running (the message has no
 * position: the one that matters is the caller's, further up). */
static void check_not_running(lua_State *L, const char *fname) {
  if (!running) return;
  lua_pushfstring(L, "%s: the loop is running already (called from one of its callbacks)", fname);
  lua_error(L);
}

/* SIGINT while the loop waits. lua5.4 runs a script with a SIGINT handler of its own,
 * which only marks the Lua state to stop at its next instruction; while the loop waits
 * in C none runs, so Ctrl-C (or kill -INT) would do nothing until some callback ran and
 * failed with "interrupted!". While a run that may wait is under way and nothing in this
 * process watches SIGINT (cluster.on("SIGINT"), the REPL), the signal has its default
 * action instead, as in Node: the process ends. The handler comes back after the run. */
typedef struct {
  int replaced;
  struct sigaction previous;
} sigint_guard;

static void find_sigint_watcher(uv_handle_t *h, void *found) {
  if (h->type == UV_SIGNAL && ((uv_signal_t *)h)->signum == SIGINT && uv_is_active(h))
    *(int *)found = 1;
}

static int is_handler(const struct sigaction *sa) {
  return (sa->sa_flags & SA_SIGINFO) || (sa->sa_handler != SIG_DFL && sa->sa_handler != SIG_IGN);
}

static void sigint_default_begin(sigint_guard *g) {
  g->replaced = 0;
  if (sigaction(SIGINT, NULL, &g->previous) != 0 || !is_handler(&g->previous)) return;
  int watched = 0;
  uv_walk(cl_loop(), find_sigint_watcher, &watched);
  if (watched) return;
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  g->replaced = sigaction(SIGINT, &dfl, NULL) == 0;
}

/* Puts the handler back unless something else took SIGINT meanwhile. */
static void sigint_default_end(sigint_guard *g) {
  struct sigaction now;
  if (!g->replaced || sigaction(SIGINT, NULL, &now) != 0 || is_handler(&now)) return;
  sigaction(SIGINT, &g->previous, NULL);
}

/* Re-raises an error kept by cl_call, with its traceback. */
static void raise_pending(lua_State *L) {
  if (cl_take_error(L)) lua_error(L);
}

static int uv_run_in_lua(lua_State *L) {
  uv_run_mode mode = (uv_run_mode)lua_tointeger(L, 1);
  int previous = cl_push_handler(L);
  int alive = uv_run(cl_loop(), mode);
  cl_stream_flush_all(); /* (what the run's last callbacks wrote: see stream.c) */
  cl_pop_handler(previous);
  lua_pushinteger(L, alive);
  return 1;
}

/* uv_run under `running`, protected: callbacks catch their own errors (cl_call), but one
 * raised outside them (out of memory in C code that builds their arguments) would
 * otherwise unwind past us and leave `running` set for good. Returns uv_run's result;
 * on such an error, puts SIGINT back (guard, if any) and raises it again. */
static int run_loop(lua_State *L, uv_run_mode mode, sigint_guard *guard) {
  lua_pushcfunction(L, uv_run_in_lua);
  lua_pushinteger(L, mode);
  running = 1;
  int status = lua_pcall(L, 1, 1, 0);
  running = 0;
  if (status != LUA_OK) {
    if (guard) sigint_default_end(guard);
    lua_error(L);
  }
  int alive = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return alive;
}

/* core.run(): runs until nothing is left or stop() is called; returns true if stopped. */
static int l_run(lua_State *L) {
  check_not_running(L, "cluster.run");
  stop_requested = 0;
  raise_pending(L);
  sigint_guard guard;
  sigint_default_begin(&guard);
  int failed = 0;
  while (!failed && run_loop(L, UV_RUN_DEFAULT, &guard) != 0 && !stop_requested)
    failed = cl_take_error(L);
  sigint_default_end(&guard);
  if (failed) return lua_error(L);
  raise_pending(L);
  lua_pushboolean(L, stop_requested);
  stop_requested = 0;
  return 1;
}

/* core.poll(): runs what is ready without blocking; returns whether work remains. */
static int l_poll(lua_State *L) {
  check_not_running(L, "cluster.poll");
  raise_pending(L);
  int alive = run_loop(L, UV_RUN_NOWAIT, NULL);
  raise_pending(L);
  lua_pushboolean(L, alive);
  return 1;
}

/* core.run_once(): runs one round; blocks for I/O only when nothing is ready. (libuv's
 * UV_RUN_ONCE runs due timers and then still blocks for I/O, so a 0 ms timer started
 * before the call, as loop.defer's is, would wait for the next unrelated event.) */
static int l_run_once(lua_State *L) {
  check_not_running(L, "core.run_once");
  raise_pending(L);
  uv_loop_t *loop = cl_loop();
  uv_update_time(loop);
  sigint_guard guard;
  sigint_default_begin(&guard);
  int alive = run_loop(L, uv_backend_timeout(loop) == 0 ? UV_RUN_NOWAIT : UV_RUN_ONCE, &guard);
  sigint_default_end(&guard);
  raise_pending(L);
  lua_pushboolean(L, alive);
  return 1;
}

static int l_stop(lua_State *L) {
  (void)L;
  stop_requested = 1;
  uv_stop(cl_loop());
  return 0;
}

static int l_now(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_now(cl_loop()));
  return 1;
}

static int l_update_time(lua_State *L) {
  (void)L;
  uv_update_time(cl_loop());
  return 0;
}

/* Monotonic time in seconds as a float, for measurements. */
static int l_hrtime(lua_State *L) {
  lua_pushnumber(L, (double)uv_hrtime() / 1e9);
  return 1;
}

/* core.loop_running(): whether this is called from a callback of the running loop. */
static int l_loop_running(lua_State *L) {
  lua_pushboolean(L, running);
  return 1;
}

static int l_alive(lua_State *L) {
  lua_pushboolean(L, uv_loop_alive(cl_loop()));
  return 1;
}

/* The poll phases begun: a prepare handle runs right before each (unref'd: it never
 * keeps the loop alive). */
static uv_prepare_t phase_counter;
static unsigned long poll_phase;

static void count_phase(uv_prepare_t *p) {
  (void)p;
  poll_phase++;
}

unsigned long cl_poll_phase(void) { return poll_phase; }

/* core.backend_fd(): the loop's epoll descriptor (libuv's uv_backend_fd), so that a
 * spec can read what it holds in /proc. */
static int l_backend_fd(lua_State *L) {
  lua_pushinteger(L, uv_backend_fd(cl_loop()));
  return 1;
}

void cl_open_loop(lua_State *L) {
  static int counting = 0;
  if (!counting) {
    uv_prepare_init(cl_loop(), &phase_counter);
    uv_prepare_start(&phase_counter, count_phase);
    uv_unref((uv_handle_t *)&phase_counter);
    counting = 1;
  }
  static const luaL_Reg fns[] = {
    {"run", l_run}, {"poll", l_poll}, {"run_once", l_run_once}, {"stop", l_stop},
    {"now", l_now}, {"update_time", l_update_time}, {"hrtime", l_hrtime}, {"alive", l_alive},
    {"loop_running", l_loop_running}, {"backend_fd", l_backend_fd},
    {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
