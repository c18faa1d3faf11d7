--- Shared helpers for the cluster specs: run the loop until a condition holds, count
-- callbacks (luv's expect(fn, count)), and leave no process behind.
--
--   local H = require "spec.helper"   -- or require "helper" (spec/ is on LUA_PATH)
--   before_each(H.setup)              -- snapshot the cluster listeners
--   after_each(H.teardown)            -- SIGKILL leftovers, restore listeners
--   ...
--   local on_exit = H.expect(function(w, code) ... end, 1)
--   cluster.on("exit", on_exit)
--   assert.is_true(H.wait_until(function() return done end, 5000))
--   H.finish()                        -- checks every expect() count, no live workers
local core = require "cluster.core"
local cluster = require "cluster"

local H = {}

H.ROOT = core.cwd()
H.FIXTURES = H.ROOT .. "/spec/fixtures/"

--- Absolute path of a fixture script.
function H.fixture(name) return H.FIXTURES .. name end

local tracked_pids = {}   -- pids started outside cluster.fork (subprocess masters, their workers)
local tracked_files = {}  -- files of spawned masters, removed at teardown
local expectations = {}
local listener_snapshot = nil

--- Runs the loop until cond() is true or timeout_ms pass. Returns whether cond held.
-- A short ticking timer keeps run_once from sleeping past a condition that does not
-- depend on the loop (a file appearing, a pid going away).
function H.wait_until(cond, timeout_ms, tick_ms)
  if cond() then return true end
  local expired = false
  -- the loop's clock is cached: after a long computation it lags, and a guard started
  -- from it would expire at once
  core.update_time()
  local guard = core.timer()
  guard:start(timeout_ms or 5000, 0, function() expired = true end)
  local tick = core.timer()
  tick:start(tick_ms or 10, tick_ms or 10, function() end)
  local ok, err = pcall(function()
    while not expired and not cond() do core.run_once() end
  end)
  guard:close()
  tick:close()
  if not ok then error(err, 0) end
  return cond() and true or false
end

--- Runs the loop for ms milliseconds (to show that something does NOT happen).
function H.run_for(ms)
  H.wait_until(function() return false end, ms)
end

--- Wraps fn so that H.finish() fails unless it ran exactly `count` times (default 1).
-- count may be {min = n} for "at least n".
function H.expect(fn, count, name)
  local e = { calls = 0, count = count or 1, name = name or debug.traceback("expect()", 2) }
  expectations[#expectations + 1] = e
  return function(...)
    e.calls = e.calls + 1
    if fn then return fn(...) end
  end
end

local function check_expectations()
  local list = expectations
  expectations = {}
  for _, e in ipairs(list) do
    if type(e.count) == "table" then
      assert(e.calls >= e.count.min, string.format("callback ran %d times, expected at least %d\n%s",
        e.calls, e.count.min, e.name))
    else
      assert(e.calls == e.count, string.format("callback ran %d times, expected %d\n%s",
        e.calls, e.count, e.name))
    end
  end
end

--- Is the process with this pid still running? A zombie counts as gone: nobody here
-- reaps orphans reparented to pid 1.
function H.alive(pid)
  local f = io.open("/proc/" .. tostring(pid) .. "/stat", "r")
  if not f then return false end
  local s = f:read("a") or ""
  f:close()
  local state = s:match("%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- The start time of a process (field 22 of /proc/PID/stat), or nil once it is gone:
-- with pid_max at 32768 and thousands of processes per run, pids are reused, so a
-- tracked pid is only ours while its start time is the one we saw.
local function start_time(pid)
  local f = io.open("/proc/" .. tostring(pid) .. "/stat", "r")
  if not f then return nil end
  local s = f:read("a") or ""
  f:close()
  local rest = s:match("%) (.*)$")
  if not rest then return nil end
  local i = 2
  for field in rest:gmatch("%S+") do
    i = i + 1
    if i == 22 then return field end
  end
  return nil
end

local tracked_start = {}  -- pid -> start time when tracked

-- Is this tracked pid still the process we tracked (and alive)?
local function tracked_alive(pid)
  return H.alive(pid) and start_time(pid) == tracked_start[pid]
end

--- Can user/group 65534 (nobody) read every one of these files? A checkout inside a
-- private (0700) directory can't be run by a worker that drops privileges; the specs
-- that drop them are pending there instead of failing for a reason outside the code.
function H.readable_by_nobody(paths)
  if not os.execute("command -v setpriv >/dev/null 2>&1") then return false end
  for _, path in ipairs(paths) do
    local ok = os.execute("setpriv --reuid=65534 --regid=65534 --clear-groups test -r " ..
      H.shell_quote(path) .. " 2>/dev/null")
    if not ok then return false end
  end
  return true
end

--- The files a worker running as nobody must read: its script, the cluster modules, the core.
function H.worker_files(script)
  return { script, package.searchpath("cluster", package.path),
           package.searchpath("cluster.core", package.cpath) }
end

local public, public_remover
--- What a process running as nobody (uid 65534) loads, where it can read it: the
-- checkout itself when nobody can read it, else a world-readable copy of the cluster
-- modules, the core in use (the sanitizer build too) and the fixtures (a clean clone
-- under `mktemp -d` or a home directory is private). Made once per process, removed at
-- its exit. Returns {path=, cpath=, fixture(name)}, or nil and why.
function H.for_nobody(script_names)
  if not os.execute("command -v setpriv >/dev/null 2>&1") then return nil, "no setpriv(1)" end
  local files = H.worker_files(H.fixture(script_names[1]))
  for i = 2, #script_names do files[#files + 1] = H.fixture(script_names[i]) end
  if H.readable_by_nobody(files) then
    return { path = package.path, cpath = package.cpath, fixture = H.fixture }
  end
  if not public then
    local dir = H.tmpname("public")
    local init = package.searchpath("cluster", package.path)     -- <lua>/cluster/init.lua
    local lua_dir = init:gsub("/cluster/init%.lua$", "")
    local core_so = package.searchpath("cluster.core", package.cpath)
    local q = H.shell_quote
    local ok = os.execute("mkdir -p " .. q(dir .. "/lua") .. " " .. q(dir .. "/lib/cluster")
      .. " && cp -r " .. q(lua_dir .. "/cluster") .. " " .. q(dir .. "/lua/")
      .. " && cp " .. q(core_so) .. " " .. q(dir .. "/lib/cluster/core.so")
      .. " && cp -r " .. q(H.FIXTURES) .. " " .. q(dir .. "/fixtures")
      .. " && chmod -R a+rX " .. q(dir))
    public_remover = setmetatable({}, { __gc = function() os.execute("rm -rf " .. q(dir)) end })
    if not ok then return nil, "could not copy the checkout to " .. dir end
    public = {
      path = dir .. "/lua/?.lua;" .. dir .. "/lua/?/init.lua",
      cpath = dir .. "/lib/?.so",
      fixture = function(name) return dir .. "/fixtures/" .. name end,
    }
  end
  return public
end

--- Remembers a pid that kill_all must SIGKILL (a process not forked by this master).
function H.track(pid)
  pid = math.tointeger(tonumber(pid))
  if pid then
    tracked_pids[#tracked_pids + 1] = pid
    tracked_start[pid] = tracked_start[pid] or start_time(pid)
  end
  return pid
end

local function all_workers()
  local seen, list = {}, {}
  for _, t in ipairs { cluster._all or {}, cluster.workers or {} } do
    for _, w in pairs(t) do
      if not seen[w] then seen[w] = true; list[#list + 1] = w end
    end
  end
  return list
end

--- SIGKILLs every worker and every tracked pid, then waits for their exit events.
-- Returns true when everything is gone.
function H.kill_all(timeout_ms)
  for _, w in ipairs(all_workers()) do
    local pid = w.process and w.process.pid
    if pid and not w:isDead() then core.kill(pid, "SIGKILL") end
  end
  for _, pid in ipairs(tracked_pids) do
    if tracked_alive(pid) then core.kill(pid, "SIGKILL") end
  end
  local ok = H.wait_until(function()
    if next(cluster._all or {}) ~= nil or next(cluster.workers) ~= nil then return false end
    for _, pid in ipairs(tracked_pids) do if tracked_alive(pid) then return false end end
    return true
  end, timeout_ms or 5000)
  if ok then tracked_pids, tracked_start = {}, {} end
  return ok
end

--- Asserts no worker is left: cluster.workers empty and every pid gone.
function H.assert_no_workers()
  assert(next(cluster.workers) == nil, "cluster.workers is not empty")
  for _, w in ipairs(all_workers()) do
    assert(not (w.process.pid and H.alive(w.process.pid)), "worker pid " .. tostring(w.process.pid) .. " is alive")
  end
end

--- before_each: remember which cluster listeners exist before the spec.
function H.setup()
  expectations = {}
  local snap = {}
  for name, list in pairs(rawget(cluster, "_listeners") or {}) do
    -- one listener is kept as the function itself, more as an array (cluster.emitter)
    local copy = list
    if type(list) == "table" then
      copy = setmetatable({}, getmetatable(list))
      for i = 1, #list do copy[i] = list[i] end
    end
    snap[name] = copy
  end
  listener_snapshot = snap
end

--- At the end of an `it`: checks expect() counts, then that no worker is left.
-- Every worker must already be gone or go within the timeout on its own.
function H.finish(timeout_ms)
  check_expectations()
  local gone = H.wait_until(function()
    return next(cluster.workers) == nil and next(cluster._all or {}) == nil
  end, timeout_ms or 5000)
  assert(gone, "workers still alive at the end of the spec")
  H.assert_no_workers()
end

--- after_each: restore the cluster listeners, SIGKILL whatever is left. Errors raised
-- by leftover callbacks while cleaning up are ignored: the spec has already failed.
function H.teardown()
  expectations = {}
  if listener_snapshot then
    rawset(cluster, "_listeners", listener_snapshot)
    listener_snapshot = nil
  end
  for _, w in ipairs(all_workers()) do w:removeAllListeners() end
  local ok
  for _ = 1, 10 do
    local fine, res = pcall(H.kill_all)
    if fine then ok = res break end
  end
  -- after the kill: a spawned master's shell writes its status file when it ends, and
  -- a file removed before that would come back
  for _, f in ipairs(tracked_files) do os.remove(f) end
  tracked_files = {}
  assert(ok, "kill_all: processes still alive after SIGKILL")
end

--- Reads a whole file, or nil.
function H.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local tmp_counter = 0
--- A fresh temporary file name (removed by the caller or left in /tmp).
-- The name carries the run's start time as well as the pid: pids are reused, and a file
-- a killed run left behind (a spawned master's status, say) must never be read as this
-- run's.
local run_stamp = string.format("%x", math.floor(core.hrtime() * 1e6))
function H.tmpname(tag)
  tmp_counter = tmp_counter + 1
  return string.format("/tmp/luacluster-spec-%d-%s-%d-%s", core.getpid(), run_stamp, tmp_counter, tag or "tmp")
end

--- A fresh temporary file name that teardown removes (whether the spec passed or not).
function H.tmpfile(tag)
  local path = H.tmpname(tag)
  tracked_files[#tracked_files + 1] = path
  return path
end

--- Quotes a string for sh.
function H.shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Starts `lua5.4 script args...` in the background with stdout and stderr in files
-- and stdin from the file `stdin` (/dev/null by default; a FIFO's writer may open it
-- once this returns: the master opens it after its pid is known).
-- Returns {pid=, out=path, err=path, status=path}; status receives the exit code.
function H.spawn_master(script, args, env, stdin)
  local out, err, status, pidfile = H.tmpname("out"), H.tmpname("err"), H.tmpname("status"), H.tmpname("pid")
  for _, f in ipairs { out, err, status, pidfile } do os.remove(f) end
  local envs, cmdline = {}, { "lua5.4", H.shell_quote(script) }
  for k, v in pairs(env or {}) do envs[#envs + 1] = k .. "=" .. H.shell_quote(v) end
  for _, a in ipairs(args or {}) do cmdline[#cmdline + 1] = H.shell_quote(a) end
  -- a subshell runs the master and then records its exit status; the inner sh writes
  -- its pid and execs the master, so that pid is the master's own
  os.execute(string.format(
    "( %s SPEC_STDIN=%s sh -c 'echo $$ > %s; exec \"$0\" \"$@\" < \"$SPEC_STDIN\"' %s > %s 2> %s; echo $? > %s ) < /dev/null > /dev/null 2>&1 &",
    table.concat(envs, " "), H.shell_quote(stdin or "/dev/null"), pidfile, table.concat(cmdline, " "), out, err, status))
  local m = { out = out, err = err, status = status }
  for _, f in ipairs { out, err, status, pidfile } do tracked_files[#tracked_files + 1] = f end
  H.wait_until(function()
    local s = H.read_file(pidfile)
    m.pid = s and math.tointeger(tonumber(s:match("%d+")))
    return m.pid ~= nil
  end, 5000)
  os.remove(pidfile)
  assert(m.pid, "spawn_master: the master did not start")
  H.track(m.pid)
  return m
end

--- The exit status of a spawned master once it ended, or nil.
function H.master_status(m)
  local s = H.read_file(m.status)
  return s and math.tointeger(tonumber(s:match("%-?%d+")))
end

--- Removes a spawned master's files.
function H.cleanup_master(m)
  os.remove(m.out)
  os.remove(m.err)
  os.remove(m.status)
end

return H
