/* Process-level facts and actions: pids, environment, processors, memory, CPU time,
 * and the orphan guard that ends a worker whose master is gone. */
#include "util.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static int l_getpid(lua_State *L) { lua_pushinteger(L, getpid()); return 1; }
static int l_getppid(lua_State *L) { lua_pushinteger(L, getppid()); return 1; }

/* core.own_process_group(): this process leads a process group of its own, so a
 * terminal's signals for its foreground group (Ctrl-C, Ctrl-Z) reach the master only.
 * (Not a session of its own: the scheduler's autogroups are per session, and a worker
 * in another one cost 10 µs more of system time per connection under load.) */
static int l_own_process_group(lua_State *L) {
  lua_pushboolean(L, setpgid(0, 0) == 0);
  return 1;
}

static int l_cpus(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_available_parallelism());
  return 1;
}

static int l_setenv(lua_State *L) {
  const char *k = luaL_checkstring(L, 1);
  if (lua_isnoneornil(L, 2)) uv_os_unsetenv(k); else uv_os_setenv(k, luaL_checkstring(L, 2));
  return 0;
}

/* core.environ() -> {"K=V", ...} */
static int l_environ(lua_State *L) {
  lua_newtable(L);
  int i = 0;
  for (char **e = environ; e && *e; e++) {
    lua_pushstring(L, *e);
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}

static int l_exepath(lua_State *L) {
  char buf[4096];
  size_t n = sizeof buf;
  int err = uv_exepath(buf, &n);
  if (err) return cl_push_fail(L, err, "exepath");
  lua_pushlstring(L, buf, n);
  return 1;
}

static int l_cwd(lua_State *L) {
  char buf[4096];
  size_t n = sizeof buf;
  int err = uv_cwd(buf, &n);
  if (err) return cl_push_fail(L, err, "cwd");
  lua_pushlstring(L, buf, n);
  return 1;
}

static int l_chdir(lua_State *L) {
  int err = uv_chdir(luaL_checkstring(L, 1));
  if (err) return cl_push_fail(L, err, "chdir");
  lua_pushboolean(L, 1);
  return 1;
}

/* core.proc_stats(pid) -> {rss=bytes, utime=s, stime=s} from /proc, or nil when gone. */
static int l_proc_stats(lua_State *L) {
  int pid = (int)luaL_optinteger(L, 1, getpid());
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  FILE *f = fopen(path, "r");
  if (f == NULL) return 0;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  if (p == NULL) return 0;
  unsigned long utime = 0, stime = 0;
  long rss = 0;
  /* fields after ')': state(3) ... utime(14) stime(15) ... rss(24) */
  if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d %*d %*d %*u %*u %ld",
             &utime, &stime, &rss) != 3)
    return 0;
  double tick = (double)sysconf(_SC_CLK_TCK);
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)rss * sysconf(_SC_PAGESIZE));
  lua_setfield(L, -2, "rss");
  lua_pushnumber(L, (double)utime / tick);
  lua_setfield(L, -2, "utime");
  lua_pushnumber(L, (double)stime / tick);
  lua_setfield(L, -2, "stime");
  return 1;
}

/* The orphan guard: a thread that polls the parent pid. When the master is gone and the
 * loop has not ended the process within `grace` ms (a worker stuck in Lua or in C), it
 * exits the process with code 0. */
static pid_t watched_parent;
static unsigned grace_ms;

static void *watch_parent(void *arg) {
  (void)arg;
  for (;;) {
    usleep(200 * 1000);
    if (getppid() != watched_parent) {
      usleep(grace_ms * 1000);
      _exit(0);
    }
  }
  return NULL;
}

static int l_watch_parent(lua_State *L) {
  static int started = 0;
  watched_parent = (pid_t)luaL_checkinteger(L, 1);
  grace_ms = (unsigned)luaL_optinteger(L, 2, 500);
  if (!started) {
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    if (pthread_create(&t, &a, watch_parent, NULL) == 0) started = 1;
    pthread_attr_destroy(&a);
  }
  lua_pushboolean(L, started);
  return 1;
}

/* core.exit(code): ends the process now, without closing the Lua state. */
static int l_exit(lua_State *L) {
  int code = (int)luaL_optinteger(L, 1, 0);
  fflush(stdout);
  fflush(stderr);
  _exit(code);
  return 0;
}

static int l_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

void cl_open_sys(lua_State *L) {
  static const luaL_Reg fns[] = {
    {"getpid", l_getpid}, {"getppid", l_getppid}, {"cpus", l_cpus}, {"setenv", l_setenv},
    {"environ", l_environ}, {"exepath", l_exepath}, {"cwd", l_cwd}, {"chdir", l_chdir},
    {"proc_stats", l_proc_stats}, {"watch_parent", l_watch_parent}, {"exit", l_exit},
    {"isatty", l_isatty}, {"own_process_group", l_own_process_group}, {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
