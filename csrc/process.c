/* Worker processes: uv_spawn with a private IPC channel on fd 3, environment, cwd,
 * uid/gid, stdio shared or piped, and the exit code or signal name on exit. */
#include "channel.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define TNAME "cluster.process"
#define CB_EXIT 0
#define CB_OUTPUT 1
#define CHANNEL_FD 3

typedef struct output_pipe {
  uv_pipe_t pipe;
  struct process *owner;   /* NULL once the process object is gone */
  const char *name;        /* "stdout" or "stderr" */
  char buf[16384];
} output_pipe;

typedef struct process {
  cl_handle h;
  int pid;
  output_pipe *out[2];
} process;

static void free_strings(char **v) {
  if (v == NULL) return;
  for (char **p = v; *p; p++) free(*p);
  free(v);
}

/* Copies the array of strings in field `name` of the table at idx into *out (NULL if
 * absent), after `first` when given. Returns 0, or -1 with the message on the stack and
 * nothing allocated. */
static int string_array(lua_State *L, int idx, const char *name, const char *first, char ***out) {
  *out = NULL;
  int t = lua_getfield(L, idx, name);
  if (t == LUA_TNIL) { lua_pop(L, 1); return 0; }
  if (t != LUA_TTABLE) {
    lua_pushfstring(L, "spawn: bad option '%s': expected a table of strings", name);
    return -1;
  }
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1); /* (not __len: the array's own length) */
  int extra = first ? 1 : 0;
  char **v = calloc((size_t)n + 1 + extra, sizeof *v);
  if (v == NULL || (first && (v[0] = strdup(first)) == NULL)) {
    free(v);
    lua_pushliteral(L, "spawn: out of memory");
    return -1;
  }
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    const char *s = lua_tostring(L, -1);
    if (s == NULL || (v[i - 1 + extra] = strdup(s)) == NULL) {
      free_strings(v);
      lua_pushfstring(L, s == NULL ? "spawn: bad option '%s': item %d is not a string" : "spawn: out of memory",
                      name, (int)i);
      return -1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  *out = v;
  return 0;
}

static void on_exit_cb(uv_process_t *p, int64_t status, int term_signal) {
  process *pr = p->data;
  lua_State *L = pr->h.L;
  if (cl_push_cb(&pr->h, CB_EXIT)) {
    if (term_signal) {
      lua_pushnil(L);
      const char *name = cl_signal_name(term_signal);
      if (name) lua_pushstring(L, name); else lua_pushinteger(L, term_signal);
    } else {
      lua_pushinteger(L, (lua_Integer)status);
      lua_pushnil(L);
    }
    cl_call(L, 2);
  }
  cl_handle_close(&pr->h);
}

static void on_output_closed(uv_handle_t *h) { free(h->data); }

static void on_output_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  output_pipe *o = h->data;
  (void)suggested;
  *buf = uv_buf_init(o->buf, sizeof o->buf);
}

static void on_output_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  output_pipe *o = s->data;
  if (nread == 0) return;
  process *pr = o->owner;
  if (pr && cl_push_cb(&pr->h, CB_OUTPUT)) {
    lua_State *L = pr->h.L;
    lua_pushstring(L, o->name);
    if (nread > 0) lua_pushlstring(L, buf->base, (size_t)nread); else lua_pushnil(L);
    cl_call(L, 2);
  }
  if (nread < 0) {
    if (o->owner) o->owner->out[o == o->owner->out[0] ? 0 : 1] = NULL;
    uv_close((uv_handle_t *)&o->pipe, on_output_closed);
  }
}

static void process_free(cl_handle *h) {
  process *pr = (process *)h;
  /* Output may still be arriving after exit; the pipes close themselves at EOF and
   * report to nobody once the process object is gone. */
  for (int i = 0; i < 2; i++) if (pr->out[i]) pr->out[i]->owner = NULL;
}

/* core.spawn{file=, args={...}, env={"K=V",...}, cwd=, uid=, gid=, silent=,
 *            on_exit=fn(code|nil, signal|nil), on_output=fn("stdout"|"stderr", chunk|nil)}
 * -> process, channel   or nil, msg, code */
static int l_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "file");
  const char *file = lua_tostring(L, -1);
  if (file == NULL) return luaL_error(L, "spawn: option 'file' must be a string");
  lua_pop(L, 1);
  lua_getfield(L, 1, "on_exit");
  luaL_argcheck(L, lua_isfunction(L, -1), 1, "option 'on_exit' must be a function");
  lua_getfield(L, 1, "on_output");
  int silent = lua_isfunction(L, -1);
  lua_getfield(L, 1, "cwd");
  const char *cwd = lua_tostring(L, -1);
  lua_getfield(L, 1, "uid");
  int has_uid = lua_isinteger(L, -1);
  lua_Integer uid = lua_tointeger(L, -1);
  lua_getfield(L, 1, "gid");
  int has_gid = lua_isinteger(L, -1);
  lua_Integer gid = lua_tointeger(L, -1);
  lua_pop(L, 2);
  /* stack: opts, on_exit, on_output, cwd */

  char **args, **env;
  if (string_array(L, 1, "args", file, &args) != 0) return lua_error(L);
  if (string_array(L, 1, "env", NULL, &env) != 0) {
    free_strings(args);
    return lua_error(L);
  }
  if (args == NULL) {
    args = calloc(2, sizeof *args);
    if (args == NULL || (args[0] = strdup(file)) == NULL) {
      free(args);
      free_strings(env);
      return luaL_error(L, "spawn: out of memory");
    }
  }

  output_pipe *outs[2] = {NULL, NULL};
  if (silent) {
    outs[0] = calloc(1, sizeof(output_pipe));
    outs[1] = calloc(1, sizeof(output_pipe));
    if (outs[0] == NULL || outs[1] == NULL) {
      free(outs[0]);
      free(outs[1]);
      free_strings(args);
      free_strings(env);
      return luaL_error(L, "spawn: out of memory");
    }
  }

  process *pr = (process *)cl_handle_new(L, sizeof(process), TNAME);
  pr->h.on_free = process_free;
  cl_channel *ch = cl_channel_push_new(L);
  /* stack: ..., process, channel */

  uv_stdio_container_t stdio[4];
  memset(stdio, 0, sizeof stdio);
  for (int i = 0; i < 3; i++) {
    stdio[i].flags = UV_INHERIT_FD;
    stdio[i].data.fd = i;
  }
  if (silent) {
    for (int i = 0; i < 2; i++) {
      uv_pipe_init(cl_loop(), &outs[i]->pipe, 0);
      outs[i]->pipe.data = outs[i];
      outs[i]->name = i == 0 ? "stdout" : "stderr";
      stdio[i + 1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
      stdio[i + 1].data.stream = (uv_stream_t *)&outs[i]->pipe;
    }
  }
  stdio[CHANNEL_FD].flags = UV_CREATE_PIPE | UV_READABLE_PIPE | UV_WRITABLE_PIPE;
  stdio[CHANNEL_FD].data.stream = (uv_stream_t *)cl_channel_pipe(ch);

  uv_process_options_t o;
  memset(&o, 0, sizeof o);
  o.exit_cb = on_exit_cb;
  o.file = file;
  o.args = args;
  o.env = env;
  o.cwd = cwd;
  o.stdio = stdio;
  o.stdio_count = 4;
  if (has_uid) { o.flags |= UV_PROCESS_SETUID; o.uid = (uv_uid_t)uid; }
  if (has_gid) { o.flags |= UV_PROCESS_SETGID; o.gid = (uv_gid_t)gid; }

  int err = uv_spawn(cl_loop(), &pr->h.u.process, &o);
  free_strings(args);
  free_strings(env);
  if (err) {
    /* the process handle must still be closed; the channel was never opened */
    cl_handle_close((cl_handle *)ch);
    cl_handle_close(&pr->h);
    for (int i = 0; i < 2; i++) if (outs[i]) uv_close((uv_handle_t *)&outs[i]->pipe, on_output_closed);
    return cl_push_fail(L, err, "spawn");
  }
  pr->pid = pr->h.u.process.pid;
  lua_pushvalue(L, 2);
  cl_set_cb(L, &pr->h, CB_EXIT, -1);
  lua_pop(L, 1);
  if (silent) {
    cl_set_cb(L, &pr->h, CB_OUTPUT, 3);
    for (int i = 0; i < 2; i++) {
      outs[i]->owner = pr;
      pr->out[i] = outs[i];
      uv_read_start((uv_stream_t *)&outs[i]->pipe, on_output_alloc, on_output_read);
    }
  }
  return 2;
}

static int p_pid(lua_State *L) {
  cl_handle **box = luaL_checkudata(L, 1, TNAME);
  if (*box == NULL) return 0;
  lua_pushinteger(L, ((process *)*box)->pid);
  return 1;
}

/* p:kill(signal) -> true | nil, msg, code */
static int p_kill(lua_State *L) {
  cl_handle **box = luaL_checkudata(L, 1, TNAME);
  int sig = cl_check_signal(L, 2, "kill");
  if (*box == NULL || cl_handle_is_closing(*box)) return cl_push_fail(L, UV_ESRCH, "kill");
  int err = uv_process_kill(&(*box)->u.process, sig);
  if (err) return cl_push_fail(L, err, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

/* core.kill(pid, signal) -> true | nil, msg, code */
static int l_kill(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  /* a pid, not a process group or every process (0, negative): and no wrap-around */
  luaL_argcheck(L, n > 0 && n <= INT_MAX, 1, "expected a process id > 0");
  int pid = (int)n;
  int sig = cl_check_signal(L, 2, "kill");
  int err = uv_kill(pid, sig);
  if (err) return cl_push_fail(L, err, "kill");
  lua_pushboolean(L, 1);
  return 1;
}

void cl_open_process(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"pid", p_pid}, {"kill", p_kill}, {"ref", cl_handle_ref_method},
    {"unref", cl_handle_unref_method}, {NULL, NULL}};
  cl_handle_register(L, TNAME, methods);
  lua_pushcfunction(L, l_spawn);
  lua_setfield(L, -2, "spawn");
  lua_pushcfunction(L, l_kill);
  lua_setfield(L, -2, "kill");
  lua_pushinteger(L, CHANNEL_FD);
  lua_setfield(L, -2, "CHANNEL_FD");
}
