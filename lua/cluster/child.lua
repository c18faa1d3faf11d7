--- The worker role: the channel to the master, cluster.worker, and the worker's
-- side of disconnect and kill.
-- @module cluster.child
local core = require "cluster.core"
local loop = require "cluster.loop"
local Worker = require "cluster.worker"
local errors = require "cluster.errors"

local M = {}

-- Flushes what the worker queued for the master when the Lua state closes (the script
-- ended without running the loop): a sentinel whose __gc runs at lua_close.
local function flush_at_exit(channel)
  local sentinel = setmetatable({}, { __gc = function()
    if channel then pcall(channel.flush_sync, channel, 1000) end
  end })
  return sentinel
end

function M.install(cluster, id)
  cluster.isMaster, cluster.isPrimary, cluster.isWorker = false, false, true
  local master_pid = core.getppid()
  -- the terminal's Ctrl-C and Ctrl-Z are for the master, which decides for its workers
  core.own_process_group()
  -- a worker's own children are masters again
  core.setenv(require("cluster.master").WORKER_ENV, nil)

  local channel = assert(core.channel_open(core.CHANNEL_FD))
  -- output piped to the master (silent) arrives line by line, not when a buffer fills
  io.stdout:setvbuf("line")
  core.watch_parent(master_pid, 500)

  local connected = true
  local impl = {}
  local worker = Worker.new(id, { pid = core.getpid() }, impl)
  worker.state = "online"
  cluster.worker = worker
  cluster._channel = channel
  cluster._exitSentinel = flush_at_exit(channel)

  local function send_internal(msg, handle, callback)
    if not connected then return false end
    return channel:send(true, msg, handle, callback)
  end
  cluster._sendInternal = function(_, msg, handle, callback) return send_internal(msg, handle, callback) end

  -- 'error' on cluster.worker, or a line on stderr when nobody listens (the master's rule
  -- for its Worker objects)
  local function report_error(err)
    if worker:listenerCount("error") > 0 then
      worker:emit("error", err)
    else
      io.stderr:write(string.format("cluster: worker %d: %s\n", worker.id, tostring(err)))
    end
  end
  cluster._reportError = function(_, err) report_error(err) end

  local function on_disconnect(reason)
    if not connected then return end
    connected = false
    cluster._channel = nil
    if reason then
      report_error(errors.new("EPROTO", "channel", "channel EPROTO: " .. reason, { errno = errors.EPROTO }))
    end
    if rawget(worker, "exitedAfterDisconnect") == nil then worker.exitedAfterDisconnect = false end
    worker.state = "disconnected"
    worker:emit("disconnect")
    if worker.exitedAfterDisconnect ~= true then
      -- the master went away without asking: end quietly, as Node's workers do
      os.exit(0)
    end
    if worker._exitOnDisconnect then os.exit(0) end
  end

  local internal = {}
  cluster._internal = internal

  -- disconnect: stop accepting, close servers, wait for them, then close the channel
  local function graceful_disconnect()
    if worker._disconnecting or not connected then return end
    worker._disconnecting = true
    worker.exitedAfterDisconnect = true
    -- Closing at once would cancel writes still in flight (a big message sent just
    -- before the master asked): close once this last message is written, which means
    -- every earlier one is written too. The master already knows when it asked.
    local function close_channel()
      if not connected then return end
      send_internal({ act = "exitedAfterDisconnect" }, nil, function()
        channel:close()
        on_disconnect(nil)
      end)
    end
    if cluster._closeSharedServers then
      cluster._closeSharedServers(close_channel)
    else
      close_channel()
    end
  end

  function internal.disconnect() graceful_disconnect() end

  local kept = require("cluster.sharing").keptHandle
  channel:start(function(is_internal, msg, handle)
    if is_internal then
      local fn = type(msg) == "table" and internal[msg.act]
      handle = kept(handle, fn and msg.act)
      if fn then fn(msg, handle) end
      return
    end
    handle = kept(handle, nil) -- (nil: the master's objects come as internal "handle" messages)
    worker:emit("message", msg, handle)
  end, on_disconnect)

  -- The channel keeps the worker alive only while someone listens for messages, or
  -- while the cluster layer waits for the master (a listen in progress, a server fed
  -- by round-robin): cluster._hold() / cluster._release().
  channel:unref()
  local listeners, holds = 0, 0
  local function update_ref()
    if not connected then return end
    if listeners + holds > 0 then channel:ref() else channel:unref() end
  end
  worker._onNewListener = function(self, name)
    if name == "message" then listeners = self:listenerCount("message") update_ref() end
  end
  worker._onRemoveListener = function(self, name)
    if name == "message" then listeners = self:listenerCount("message") update_ref() end
  end
  function cluster._hold() holds = holds + 1 update_ref() end
  function cluster._release() holds = holds - 1 update_ref() end

  function impl.send(_, message, handle, callback)
    if not connected then
      local err = errors.new("ERR_IPC_CHANNEL_CLOSED", "send", "channel closed")
      if callback then loop.defer(callback, err) else loop.defer(report_error, err) end
      return false
    end
    if handle ~= nil then return cluster._sendWithHandle(nil, message, handle, callback) end
    local ok, res = pcall(channel.send, channel, false, message, nil, callback)
    if not ok then errors.raise(res) end
    return res
  end

  function impl.kill()
    worker.exitedAfterDisconnect = true
    if not connected then os.exit(0) end
    worker._exitOnDisconnect = true
    send_internal({ act = "exitedAfterDisconnect" }, nil, function()
      channel:close()
      on_disconnect(nil)
    end)
  end

  function impl.disconnect() graceful_disconnect() end
  function impl.isDead() return false end
  function impl.isConnected() return connected end

  -- the master's functions raise in a worker, each naming itself
  local function master_only(fname, why)
    return function() error(fname .. ": " .. why, 2) end
  end
  local NO_FORK = "cannot fork from a worker (cluster.isWorker is true); only the master forks"
  local NO_SETUP = "cannot be called from a worker; only the master forks"
  cluster.fork = master_only("fork", NO_FORK)
  cluster.autoFork = master_only("autoFork", NO_FORK)
  cluster.setupMaster = master_only("setupMaster", NO_SETUP)
  cluster.setupPrimary = master_only("setupPrimary", NO_SETUP)
  cluster.disconnect = master_only("disconnect",
    "cluster.disconnect() is a master function; in a worker use cluster.worker:disconnect()")

  require("cluster.sharing").installWorker(cluster)
  require("cluster.signals").install(cluster)   -- cluster.on("SIGTERM", fn) in a worker too

  -- the supervisor's watchdog: the worker's loop beats from a C timer
  local beat_ms = math.tointeger(tonumber(os.getenv("LUACLUSTER_HEARTBEAT_MS") or ""))
  core.setenv("LUACLUSTER_HEARTBEAT_MS", nil)
  if beat_ms and beat_ms > 0 then channel:heartbeat(beat_ms) end

  --- Tells the master this worker is ready (for supervisors configured with
  -- readiness = "explicit"; workers that warm up before they can serve).
  function worker:ready()
    send_internal({ act = "ready" })
    return self
  end

  send_internal({ act = "online" })
  -- A fresh channel takes this one small message at once unless the master's end is
  -- closed: the master died before this worker got here, so master_pid above is already
  -- the reaper's and the parent watch would never fire. End as an orphaned worker does.
  if not channel:flush_sync(1000) then os.exit(0) end
end

return M
