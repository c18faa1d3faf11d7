/* Line input for the REPL, served by the loop: GNU readline's callback interface over a
 * uv_poll when stdin is a terminal and libreadline can be loaded (dlopen, so the build
 * does not need it), otherwise plain reads of fd 0 on libuv's thread pool, which work
 * the same for terminals, pipes and files. And the REPL's Ctrl-C: at the prompt it
 * drops the line (readline_cancel, from the REPL's SIGINT watcher); while a statement
 * runs it interrupts it (call_interruptible). */
#include "util.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>

typedef void (*rl_vcpfunc_t)(char *);
static struct {
  void *lib;
  void (*install)(const char *, rl_vcpfunc_t);
  void (*read_char)(void);
  void (*remove)(void);
  void (*add_history)(const char *);
  int (*set_prompt)(const char *);
  int (*forced_update_display)(void);
  void (*replace_line)(const char *, int);   /* the rest: for Ctrl-C, where present */
  int (*crlf)(void);
  int (*on_new_line)(void);
  void (*sigcleanup)(void);
} rl;

static int in_line_handler = 0; /* Lua is running the line just entered */

static lua_State *reader_L;
static int line_cb = LUA_NOREF;
static int active = 0;
static uv_poll_t *poll_handle;   /* readline's: one per start, freed once closed */
static int poll_open = 0;
static uv_fs_t read_req;
static int read_in_flight = 0;    /* read_req is on the thread pool (it cannot be cancelled) */
static char read_buf[4096];
static cl_buf pending_line;
static char *plain_prompt = NULL;

static int load_readline(void) {
  if (rl.lib) return 1;
  const char *names[] = {"libreadline.so.8", "libreadline.so", NULL};
  for (int i = 0; names[i] && !rl.lib; i++) rl.lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
  if (!rl.lib) return 0;
  rl.install = (void (*)(const char *, rl_vcpfunc_t))dlsym(rl.lib, "rl_callback_handler_install");
  rl.read_char = (void (*)(void))dlsym(rl.lib, "rl_callback_read_char");
  rl.remove = (void (*)(void))dlsym(rl.lib, "rl_callback_handler_remove");
  rl.add_history = (void (*)(const char *))dlsym(rl.lib, "add_history");
  rl.set_prompt = (int (*)(const char *))dlsym(rl.lib, "rl_set_prompt");
  rl.forced_update_display = (int (*)(void))dlsym(rl.lib, "rl_forced_update_display");
  rl.replace_line = (void (*)(const char *, int))dlsym(rl.lib, "rl_replace_line");
  rl.crlf = (int (*)(void))dlsym(rl.lib, "rl_crlf");
  rl.on_new_line = (int (*)(void))dlsym(rl.lib, "rl_on_new_line");
  rl.sigcleanup = (void (*)(void))dlsym(rl.lib, "rl_callback_sigcleanup");

  if (!rl.install || !rl.read_char || !rl.remove) {
    dlclose(rl.lib);
    memset(&rl, 0, sizeof rl);
    return 0;
  }
  return 1;
}

/* Gives one line (or nil at end of input) to Lua. */
static void deliver(const char *line, size_t len) {
  lua_State *L = reader_L;
  if (line_cb == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, line_cb);
  if (line) lua_pushlstring(L, line, len); else lua_pushnil(L);
  cl_call(L, 1);
}

static void stop_reading(void);

/* An interruptible call: SIGINT while Lua code the REPL runs does not return makes it
 * fail with "interrupted!" (as lua5.4 -i does), through a hook set from the signal
 * handler (lua_sethook may be called there). */
static lua_State *interrupt_L;

static void interrupted(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void on_sigint(int sig) {
  (void)sig;
  lua_sethook(interrupt_L, interrupted, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

/* The message handler: a string gets the traceback, anything else goes back as it is
 * (as debug.traceback does; the REPL shows it with tostring). */
static int with_traceback(lua_State *L) {
  if (lua_type(L, 1) != LUA_TSTRING) return 1;
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

/* core.call_interruptible(fn) -> true, results... | false, message with traceback */
static int l_call_interruptible(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushcfunction(L, with_traceback);
  lua_insert(L, 1);
  struct sigaction sa, previous;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  sigemptyset(&sa.sa_mask);
  lua_State *outer = interrupt_L;
  interrupt_L = L;
  int installed = sigaction(SIGINT, &sa, &previous) == 0;
  int status = lua_pcall(L, lua_gettop(L) - 2, LUA_MULTRET, 1);
  if (installed) sigaction(SIGINT, &previous, NULL);
  interrupt_L = outer;
  lua_sethook(L, NULL, 0, 0);
  lua_pushboolean(L, status == LUA_OK);
  lua_replace(L, 1);
  return lua_gettop(L);
}

static void on_rl_line(char *line) {
  if (line == NULL) {
    stop_reading();
    deliver(NULL, 0);
    return;
  }
  if (*line && rl.add_history) rl.add_history(line);
  in_line_handler = 1;
  deliver(line, strlen(line));
  in_line_handler = 0;
  free(line);
}

static void on_poll(uv_poll_t *p, int status, int events) {
  (void)p; (void)events;
  if (status < 0) { stop_reading(); deliver(NULL, 0); return; }
  rl.read_char();
}

static void start_plain_read(void);

static void on_plain_read(uv_fs_t *req) {
  ssize_t n = req->result;
  read_in_flight = 0;
  uv_fs_req_cleanup(req);
  if (!active) return;
  if (n <= 0) {
    if (pending_line.len > 0) deliver(pending_line.data, pending_line.len);
    pending_line.len = 0;
    stop_reading();
    deliver(NULL, 0);
    return;
  }
  for (ssize_t i = 0; i < n; i++) {
    if (read_buf[i] == '\n') {
      size_t len = pending_line.len;
      if (len > 0 && pending_line.data[len - 1] == '\r') len--;
      pending_line.len = 0;
      deliver(pending_line.data ? pending_line.data : "", len);
      if (!active) return;
    } else {
      cl_buf_append(&pending_line, &read_buf[i], 1);
    }
  }
  start_plain_read();
}

static void start_plain_read(void) {
  if (plain_prompt && pending_line.len == 0) { fputs(plain_prompt, stdout); fflush(stdout); }
  uv_buf_t b = uv_buf_init(read_buf, sizeof read_buf);
  if (uv_fs_read(cl_loop(), &read_req, 0, &b, 1, -1, on_plain_read) == 0) read_in_flight = 1;
}

static void free_poll(uv_handle_t *h) { free(h); }

static void stop_reading(void) {
  if (!active) return;
  active = 0;
  if (poll_open) {
    rl.remove();
    uv_poll_stop(poll_handle);
    uv_close((uv_handle_t *)poll_handle, free_poll);
    poll_handle = NULL;
    poll_open = 0;
  }
}

/* core.readline_start(prompt, on_line(line|nil)) -> "readline" | "plain" */
static int l_readline_start(lua_State *L) {
  const char *prompt = luaL_checkstring(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (active) return luaL_error(L, "repl: already reading input");
  reader_L = L;
  luaL_unref(L, LUA_REGISTRYINDEX, line_cb);
  lua_pushvalue(L, 2);
  line_cb = luaL_ref(L, LUA_REGISTRYINDEX);
  active = 1;
  if (isatty(0) && load_readline() && getenv("LUACLUSTER_NO_READLINE") == NULL) {
    poll_handle = malloc(sizeof *poll_handle);
    if (poll_handle == NULL) {
      stop_reading();
      return luaL_error(L, "repl: out of memory");
    }
    uv_poll_init(cl_loop(), poll_handle, 0);
    poll_open = 1;
    rl.install(prompt, on_rl_line);
    uv_poll_start(poll_handle, UV_READABLE, on_poll);
    lua_pushliteral(L, "readline");
    return 1;
  }
  free(plain_prompt);
  plain_prompt = strdup(prompt);
  if (!read_in_flight) {
    start_plain_read();
  } else { /* the read of an earlier start goes on, for this one */
    fputs(prompt, stdout);
    fflush(stdout);
  }
  lua_pushliteral(L, "plain");
  return 1;
}

/* core.readline_prompt(prompt): the prompt for the next line (readline shows it once
 * the line handler returns). */
static int l_readline_prompt(lua_State *L) {
  const char *prompt = luaL_checkstring(L, 1);
  if (poll_open) {
    if (rl.set_prompt) rl.set_prompt(prompt);
  } else {
    free(plain_prompt);
    plain_prompt = strdup(prompt);
  }
  return 0;
}

/* core.readline_hide() / readline_show(): around output written while the user sits at
 * the prompt (an event listener that prints), so the line being typed is cleared first
 * and redrawn after, not mixed with the output. */
static int l_readline_hide(lua_State *L) {
  (void)L;
  if (poll_open && !in_line_handler) { fputs("\r\033[K", stdout); fflush(stdout); }
  return 0;
}

static int l_readline_show(lua_State *L) {
  (void)L;
  if (poll_open && !in_line_handler && rl.forced_update_display) { fflush(stdout); rl.forced_update_display(); }
  return 0;
}

/* core.readline_cancel(prompt): Ctrl-C (SIGINT) at the prompt: the line being typed is
 * dropped and a fresh prompt shows on a new line. */
static int l_readline_cancel(lua_State *L) {
  const char *prompt = luaL_checkstring(L, 1);
  if (!active) return 0;
  if (poll_open) {
    if (rl.sigcleanup) rl.sigcleanup();
    if (rl.replace_line) rl.replace_line("", 0);
    if (rl.set_prompt) rl.set_prompt(prompt);
    fputs("^C", stdout);
    if (rl.crlf) rl.crlf(); else fputs("\n", stdout);
    if (rl.on_new_line) rl.on_new_line();
    fflush(stdout);
    if (rl.forced_update_display) rl.forced_update_display();
  } else {
    /* (a terminal's driver drops the typed line itself; what a pipe sent is kept) */
    free(plain_prompt);
    plain_prompt = strdup(prompt);
    fputs("\n", stdout);
    if (pending_line.len == 0) fputs(prompt, stdout);
    fflush(stdout);
  }
  return 0;
}

static int l_readline_stop(lua_State *L) {
  (void)L;
  stop_reading();
  return 0;
}

void cl_open_tty(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"readline_start", l_readline_start}, {"readline_prompt", l_readline_prompt},
    {"readline_stop", l_readline_stop}, {"readline_hide", l_readline_hide},
    {"readline_show", l_readline_show}, {"readline_cancel", l_readline_cancel},
    {"call_interruptible", l_call_interruptible}, {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
