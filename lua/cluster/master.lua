--- The master role: forking workers, settings, the workers table and cluster events.
-- @module cluster.master
local core = require "cluster.core"
local loop = require "cluster.loop"
local Worker = require "cluster.worker"
local errors = require "cluster.errors"

local M = {}

local type, pairs, ipairs, tostring, error = type, pairs, ipairs, tostring, error

--- The environment variable that marks a worker and carries its id.
M.WORKER_ENV = "LUACLUSTER_WORKER_ID"

--- How long the master keeps reading a dead worker's channel before it stops waiting
-- for the end of file (a process the worker started may hold the channel open).
M.EXIT_DRAIN_MS = 100

local SETTING_TYPES = {
  exec = "string", args = "table", execArgv = "table", execPath = "string",
  silent = "boolean", cwd = "string", uid = "integer", gid = "integer",
}

local function copy_array(t)
  local r = {}
  for i = 1, #t do r[i] = t[i] end
  return r
end

local function copy_settings(s)
  local r = {}
  for k, v in pairs(s) do r[k] = type(v) == "table" and copy_array(v) or v end
  return r
end

local function absolute(path, base)
  if path:sub(1, 1) == "/" then return path end
  return base .. "/" .. path
end

-- Interpreter options the master itself was started with (lua5.4 -W -l x script.lua):
-- the negative indices of `arg` between the interpreter name and the script.
local function default_exec_argv()
  local argv, lowest = {}, 0
  if type(arg) ~= "table" then return argv end
  while arg[lowest - 1] ~= nil do lowest = lowest - 1 end
  for i = lowest + 1, -1 do
    if arg[i] ~= "-i" and arg[i] ~= "-" then argv[#argv + 1] = arg[i] end
  end
  return argv
end

local function default_settings()
  local s = { args = {}, execArgv = default_exec_argv(), silent = false }
  s.execPath = core.exepath() or "lua5.4"
  if type(arg) == "table" then
    if type(arg[0]) == "string" and arg[0] ~= "-" then s.exec = absolute(arg[0], core.cwd()) end
    for i = 1, #arg do s.args[i] = arg[i] end
  end
  return s
end

-- uid_t and gid_t are 32 bits; (uid_t)-1 means "leave it as it is" to setuid/setgid
local MAX_ID = 0xFFFFFFFE

local function check_settings(fname, s)
  if s == nil then return {} end
  if type(s) ~= "table" then
    errors.raise(fname .. ": bad argument #1 (settings): expected a table, got " .. type(s))
  end
  for k, v in pairs(s) do
    local want = SETTING_TYPES[k]
    if want then
      local got = want == "integer" and math.type(v) or type(v)
      if got ~= want then
        errors.raise(string.format("%s: bad field '%s' in settings: expected %s, got %s", fname, k, want,
          want == "integer" and (math.type(v) or type(v)) or type(v)))
      end
      if want == "integer" and (v < 0 or v > MAX_ID) then
        errors.raise(string.format("%s: bad field '%s' in settings: expected an integer from 0 to %d, got %d",
          fname, k, MAX_ID, v))
      end
      if want == "table" then
        for i, a in ipairs(v) do
          if type(a) ~= "string" and type(a) ~= "number" then
            errors.raise(string.format("%s: bad field '%s' in settings: item %d is a %s, expected a string", fname, k, i, type(a)))
          end
        end
      end
    end
  end
  return s
end

-- The environment table fork(env) takes, as strings; `what` starts the error message
-- (the function and the argument).
local function check_env(env, what)
  what = what or "fork: bad argument #1 (env)"
  if env == nil then return {} end
  if type(env) ~= "table" then
    errors.raise(what .. ": expected a table, got " .. type(env))
  end
  local r = {}
  for k, v in pairs(env) do
    if type(k) ~= "string" then
      errors.raise(what .. ": keys must be strings, got a " .. type(k))
    end
    if k == "" or k:find("[=%z]") then
      errors.raise(string.format("%s: %q is not a variable name (empty, or holds '=' or a zero byte)", what, k))
    end
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" and tv ~= "boolean" then
      errors.raise(what .. ": env." .. k .. " is a " .. tv .. ", expected a string")
    end
    v = tostring(v)
    if v:find("%z") then
      errors.raise(what .. ": env." .. k .. " holds a zero byte")
    end
    r[k] = v
  end
  return r
end

-- errno numbers (Linux) of the codes a failed spawn reports
local ERRNO = { EPERM = 1, ENOENT = 2, EIO = 5, ENOEXEC = 8, EAGAIN = 11, ENOMEM = 12,
                EACCES = 13, ENOTDIR = 20, EISDIR = 21, ENFILE = 23, EMFILE = 24, ENAMETOOLONG = 36, ELOOP = 40 }
local ERRNO_NAME = {}
for name, n in pairs(ERRNO) do ERRNO_NAME[n] = name end

-- The master's own want of descriptors says nothing about the file it could not open:
-- the spawn fails for the same reason and says so, naming the interpreter as for any
-- other spawn error (not the script or the directory, which may be fine).
local function out_of_descriptors(errno) return errno == ERRNO.EMFILE or errno == ERRNO.ENFILE end

-- The spawn error for `path`, which io could not use as `opened`: what it is, and io's
-- message (without its file name) and errno.
local function spawn_error(path, opened, what, msg, errno)
  local code = ERRNO_NAME[errno] or "EIO"
  local why = tostring(msg):gsub("^" .. opened:gsub("%p", "%%%0") .. ": ", "")
  return errors.new(code, "spawn", string.format("spawn %s %s (%s: %s)", code, path, what, why),
    { path = path, errno = errno and -errno })
end

-- nil when the worker script can be read (or the master cannot tell: no descriptor
-- left), else an error object saying why not
local function unreadable_script(path)
  local f, msg, errno = io.open(path, "r")
  if f then
    local ok, rmsg, rerrno = f:read(0)
    f:close()
    if ok ~= nil or rmsg == nil then return nil end
    msg, errno = rmsg, rerrno
  end
  if out_of_descriptors(errno) then return nil end
  return spawn_error(path, path, "cannot open the worker script", msg, errno)
end

-- nil when the directory `cwd` can be a worker's working directory, else an error object
-- saying why not (a failed spawn's ENOENT or EACCES is then about it, not the interpreter);
-- nil too when the master has no descriptor left to look
local function unusable_cwd(cwd)
  local f, msg, errno = io.open(cwd .. "/.", "r")
  if f then f:close() return nil end
  if out_of_descriptors(errno) then return nil end
  return spawn_error(cwd, cwd .. "/.", "the working directory, settings.cwd", msg, errno)
end

--- Installs the master role into the cluster table.
function M.install(cluster)
  cluster._checkEnv = check_env -- (for the supervisor's env option)
  cluster.isMaster, cluster.isPrimary, cluster.isWorker = true, true, false
  cluster.workers = {}
  cluster.settings = {}

  local settings = nil      -- the cumulative settings, nil before the first setupMaster
  local next_id = 1
  local policy = nil        -- frozen at the first fork/setupMaster
  local disconnect_waiters = {}

  -- fname: the function the user called, named in the error when the policy is not one
  local function freeze_policy(fname)
    if policy then return end
    local wanted = cluster.schedulingPolicy
    if wanted ~= cluster.SCHED_RR and wanted ~= cluster.SCHED_NONE then
      errors.raise(("%s: cluster.schedulingPolicy must be cluster.SCHED_RR or cluster.SCHED_NONE, got %s")
        :format(fname, type(wanted) == "string" and string.format("%q", wanted) or tostring(wanted)))
    end
    policy = wanted
  end
  cluster._policy = function() freeze_policy("listen") return policy end

  local function setup(fname, s)
    s = check_settings(fname, s)
    freeze_policy(fname)
    settings = settings or default_settings()
    for k, v in pairs(s) do
      settings[k] = type(v) == "table" and copy_array(v) or v
    end
    if type(settings.exec) == "string" then settings.exec = absolute(settings.exec, core.cwd()) end
    cluster.settings = copy_settings(settings)
    loop.defer(cluster.emit, cluster, "setup", copy_settings(settings))
  end

  --- Changes the settings used by later forks; 'setup' fires on every call.
  function cluster.setupMaster(s) setup("setupMaster", s) end
  --- The same as setupMaster (Node's newer name).
  function cluster.setupPrimary(s) setup("setupPrimary", s) end

  local function remove_worker(worker)
    if cluster.workers[worker.id] == worker then
      cluster.workers[worker.id] = nil
      if cluster._onWorkerRemoved then cluster._onWorkerRemoved(worker) end
    end
  end

  local function check_all_disconnected()
    if #disconnect_waiters == 0 then return end
    for _, w in pairs(cluster._all) do
      if w._connected and w._disconnecting then return end
    end
    if cluster._sharedHandleCount and cluster._sharedHandleCount() > 0 then return end
    local waiters = disconnect_waiters
    disconnect_waiters = {}
    for _, cb in ipairs(waiters) do loop.defer(cb) end
  end
  cluster._checkAllDisconnected = check_all_disconnected

  -- every worker not yet both dead and disconnected, including those already out of
  -- cluster.workers (a master-initiated disconnect removes them at once)
  cluster._all = {}

  local function report_error(worker, err)
    if worker:listenerCount("error") > 0 then
      worker:emit("error", err)
    else
      io.stderr:write(string.format("cluster: worker %d: %s\n", worker.id, tostring(err)))
    end
  end
  cluster._reportError = report_error

  local on_disconnect

  local function emit_exit(worker, code, signal)
    worker._dead = true
    if cluster._onWorkerExited then cluster._onWorkerExited(worker) end
    remove_worker(worker)
    cluster._all[worker.id] = nil
    worker.exitedAfterDisconnect = worker.exitedAfterDisconnect == true
    worker.state = "dead"
    worker:emit("exit", code, signal)
    worker:emit("death", worker)
    cluster:emit("exit", worker, code, signal)
    cluster:emit("death", worker)
    if cluster._onSupervisedExit then cluster._onSupervisedExit(worker, code, signal) end
  end

  -- The process is gone. While its channel is open, what the worker wrote before it died
  -- (its 'online', 'listening', last messages) is still to be read: 'exit' waits for the
  -- channel's end, so that it comes after all of them, as the order fork < online <
  -- listening < {disconnect, exit} promises. A process the worker started may hold the
  -- channel's descriptor: stop waiting for that end of file after EXIT_DRAIN_MS.
  local function on_exit(worker, code, signal)
    worker._exited = true
    if not worker._connected then return emit_exit(worker, code, signal) end
    worker._pendingExit = { code, signal, loop.setTimeout(function()
      worker._channel:close()
      on_disconnect(worker, nil)
    end, M.EXIT_DRAIN_MS) }
  end

  function on_disconnect(worker, reason)
    if not worker._connected then return end
    worker._connected = false
    if reason then
      report_error(worker, errors.new("EPROTO", "channel", "channel EPROTO: " .. reason, { errno = errors.EPROTO }))
    end
    if cluster._onWorkerDisconnected then cluster._onWorkerDisconnected(worker) end
    local pending = worker._pendingExit
    worker._pendingExit = nil
    if pending then loop.clearTimeout(pending[3]) end
    worker.exitedAfterDisconnect = worker.exitedAfterDisconnect == true
    worker.state = "disconnected"
    worker:emit("disconnect")
    cluster:emit("disconnect", worker)
    check_all_disconnected()
    if pending then emit_exit(worker, pending[1], pending[2]) end
  end

  local internal = {}
  cluster._internal = internal

  function internal.online(worker)
    worker.state = "online"
    worker:emit("online")
    cluster:emit("online", worker)
  end

  function internal.listening(worker, msg)
    worker.state = "listening"
    local address = { address = msg.address, port = msg.port, addressType = msg.addressType }
    worker:emit("listening", address)
    cluster:emit("listening", worker, address)
  end

  function internal.ready(worker)
    if cluster._markReady then cluster._markReady(worker) end
  end

  function internal.exitedAfterDisconnect(worker)
    worker.exitedAfterDisconnect = true
  end

  local kept = require("cluster.sharing").keptHandle
  local function on_message(worker, is_internal, msg, handle)
    if is_internal then
      local fn = type(msg) == "table" and internal[msg.act]
      handle = kept(handle, fn and msg.act)
      if fn then fn(worker, msg, handle) end
      return
    end
    handle = kept(handle, nil) -- (nil: a user's object comes as an internal "handle" message)
    worker:emit("message", msg, handle)
    cluster:emit("message", worker, msg, handle)
  end

  local impl = {}

  function impl.send(worker, message, handle, callback)
    if not worker._connected then
      local err = errors.new("ERR_IPC_CHANNEL_CLOSED", "send", "channel closed")
      if callback then loop.defer(callback, err) else loop.defer(report_error, worker, err) end
      return false
    end
    if handle ~= nil then return cluster._sendWithHandle(worker, message, handle, callback) end
    local ok, res = pcall(worker._channel.send, worker._channel, false, message, nil, callback)
    if not ok then errors.raise(res) end
    return res
  end

  function impl.sendInternal(worker, message, handle, callback)
    if not worker._connected then return false end
    return worker._channel:send(true, message, handle, callback)
  end
  cluster._sendInternal = impl.sendInternal

  function impl.kill(worker, signal)
    if worker._exited or not worker._proc then return end
    local ok, err = worker._proc:kill(signal or "SIGTERM")
    if not ok and not worker._exited then report_error(worker, err) end
  end

  function impl.disconnect(worker)
    if not worker._connected or worker._disconnecting then return end
    worker._disconnecting = true
    worker.exitedAfterDisconnect = true
    impl.sendInternal(worker, { act = "disconnect" })
    if cluster._onWorkerDisconnecting then cluster._onWorkerDisconnecting(worker) end
    remove_worker(worker)
  end

  function impl.isDead(worker) return worker._dead == true end
  function impl.isConnected(worker) return worker._connected == true end

  local function build_env(user_env, id)
    -- The master's module paths reach the worker unless the user set their own. Lua 5.4
    -- reads LUA_PATH_5_4 before LUA_PATH, so an inherited LUA_PATH_5_4 is always dropped:
    -- it would hide both the master's package.path and a LUA_PATH given in fork(env).
    local extra, drop = {}, { [M.WORKER_ENV] = true }
    for _, var in ipairs { "PATH", "CPATH" } do
      local versioned, plain = "LUA_" .. var .. "_5_4", "LUA_" .. var
      drop[versioned] = true
      if user_env[versioned] == nil and user_env[plain] == nil then
        extra[#extra + 1] = versioned .. "=" .. (var == "PATH" and package.path or package.cpath)
      end
    end
    local env = {}
    for _, kv in ipairs(core.environ()) do
      local k = kv:match("^([^=]*)=")
      if k and user_env[k] == nil and not drop[k] then env[#env + 1] = kv end
    end
    for k, v in pairs(user_env) do
      if k ~= M.WORKER_ENV then env[#env + 1] = k .. "=" .. v end
    end
    for _, kv in ipairs(extra) do env[#env + 1] = kv end
    env[#env + 1] = M.WORKER_ENV .. "=" .. id
    return env
  end

  -- A worker that never started: 'error' says why, then 'exit' with the negated errno
  -- (libuv's convention, as Node reports a failed spawn).
  local function spawn_failed(worker, err)
    err.errno = err.errno or -(ERRNO[err.code] or 1)
    loop.defer(function()
      report_error(worker, err)
      on_exit(worker, err.errno, nil)
    end)
  end

  local function spawn_args(s)
    local args = {}
    for _, a in ipairs(s.execArgv) do args[#args + 1] = tostring(a) end
    -- load the cluster module first, so every worker reports 'online' and guards
    -- against outliving its master even if its script never requires it
    args[#args + 1] = "-e"
    args[#args + 1] = "require('cluster')"
    args[#args + 1] = s.exec
    for _, a in ipairs(s.args) do args[#args + 1] = tostring(a) end
    return args
  end

  --- Spawns a worker. @tparam[opt] table env extra environment variables
  -- @treturn Worker already in cluster.workers; 'fork' fires later
  function cluster.fork(env)
    env = check_env(env)
    setup("fork")
    local s = settings
    if type(s.exec) ~= "string" then
      error("fork: no worker script: call cluster.setupMaster{exec = 'worker.lua'} first", 2)
    end
    local id = next_id
    next_id = next_id + 1
    local process = { pid = nil }
    local worker = Worker.new(id, process, impl)
    worker._forkedHr = core.hrtime()
    process.kill = function(_, sig)
      if not worker._proc then return nil, "kill ESRCH: no such process", "ESRCH" end
      return worker._proc:kill(sig or "SIGTERM")
    end
    worker.env = env
    cluster.workers[id] = worker
    cluster._all[id] = worker

    -- A worker script that cannot be read would only make the interpreter print why and
    -- exit 1; say why on the worker's 'error' instead, as for an execPath that is missing.
    local unreadable = unreadable_script(s.exec)
    if unreadable then
      worker._connected = false
      loop.defer(cluster.emit, cluster, "fork", worker)
      spawn_failed(worker, unreadable)
      return worker
    end

    local proc, channel_or_err, code = core.spawn {
      file = s.execPath,
      args = spawn_args(s),
      env = build_env(env, id),
      cwd = s.cwd,
      uid = s.uid,
      gid = s.gid,
      on_exit = function(c, sig) on_exit(worker, c, sig) end,
      on_output = s.silent and function(name, chunk)
        if cluster._onWorkerOutput then return cluster._onWorkerOutput(worker, name, chunk) end
        -- silent: the output is the master's to handle; by default it is not shown
      end or nil,
    }
    loop.defer(cluster.emit, cluster, "fork", worker)
    if not proc then
      worker._connected = false
      local why = tostring(channel_or_err):gsub("^spawn %u+: ", "")
      spawn_failed(worker, (s.cwd and unusable_cwd(s.cwd)) or errors.new(code, "spawn",
        string.format("spawn %s %s (%s)", code, s.execPath, why), { path = s.execPath }))
      return worker
    end
    worker._proc = proc
    worker._channel = channel_or_err
    worker._connected = true
    process.pid = proc:pid()
    channel_or_err:start(function(is_internal, msg, handle)
      on_message(worker, is_internal, msg, handle)
    end, function(reason)
      on_disconnect(worker, reason)
    end)
    return worker
  end

  --- Disconnects every worker; callback runs once all have disconnected.
  function cluster.disconnect(callback)
    if callback ~= nil and type(callback) ~= "function" then
      error("disconnect: bad argument #1 (callback): expected a function, got " .. type(callback), 2)
    end
    if callback then disconnect_waiters[#disconnect_waiters + 1] = callback end
    for _, w in pairs(cluster.workers) do
      if w._connected then w:disconnect() end
    end
    loop.defer(check_all_disconnected)
  end

  require("cluster.sharing").installMaster(cluster)
  require("cluster.signals").install(cluster)
  require("cluster.output").install(cluster)
  require("cluster.stats").install(cluster)
  require("cluster.supervise").install(cluster)

  --- Forks one worker per processor (the v0.6 API). @treturn table the workers forked
  function cluster.autoFork()
    local forked = {}
    for _ = 1, core.cpus() do forked[#forked + 1] = cluster.fork() end
    return forked
  end
end

return M
