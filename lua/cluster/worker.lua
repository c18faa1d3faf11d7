--- The Worker object: the same class in both roles; each role supplies the methods
-- that act (send, kill, disconnect) through an implementation table.
-- @module cluster.worker
local Emitter = require "cluster.emitter"
local errors = require "cluster.errors"
local core = require "cluster.core"
local signal_number, encode, MAX_MESSAGE = core.signal_number, core.encode, core.MAX_MESSAGE

local Worker = Emitter.mixin({})

--- Bytes waiting to be written past which `send` returns false (Node's threshold:
-- twice 64 KiB in its channel's write queue). Read-only.
Worker.BACKLOG_LIMIT = core.SEND_BACKLOG_LIMIT

local ALIASES = { suicide = "exitedAfterDisconnect", uniqueID = "id" }

Worker.__index = function(self, k)
  local alias = ALIASES[k]
  if alias then return rawget(self, alias) end
  return Worker[k]
end

function Worker.__tostring(self)
  return string.format("Worker(id=%s, pid=%s, state=%s)", tostring(rawget(self, "id")),
    tostring(self.process and self.process.pid), tostring(rawget(self, "state")))
end

--- Creates a worker object. `impl` provides send, kill, disconnect, isConnected, isDead.
function Worker.new(id, process, impl)
  return setmetatable({ id = id, process = process, state = "none", _impl = impl }, Worker)
end

-- Raises what a send on an open channel raises for a message no channel can carry:
-- misuse is misuse whether or not the other side is still there.
local function check_message(message)
  local ok, bytes = pcall(encode, message)
  if not ok then errors.raise((tostring(bytes):gsub("^encode: value", "worker:send: message", 1))) end
  if #bytes > MAX_MESSAGE then
    errors.raise(("worker:send: message is %d bytes encoded, over the limit of %d bytes"):format(#bytes, MAX_MESSAGE))
  end
end

--- Sends a message (and optionally a net/dgram handle) to the other side.
-- @param message any Lua value made of nil, booleans, numbers, strings and tables
-- @param[opt] handle a cluster.net server or socket, or a cluster.dgram socket
-- @tparam[opt] function callback called with nil or an error once written
-- @treturn boolean false when the channel is closed (the callback, or else `'error'`,
-- gets ERR_IPC_CHANNEL_CLOSED) or once BACKLOG_LIMIT bytes or more wait to be
-- written (the message is queued all the same: Node's hint to wait for a callback)
function Worker:send(message, handle, callback)
  if callback == nil and type(handle) == "function" then handle, callback = nil, handle end
  if callback ~= nil and type(callback) ~= "function" then
    error("worker:send: bad argument #3 (callback): expected a function, got " .. type(callback), 2)
  end
  local impl = self._impl
  -- (a message that goes with a handle travels inside the sharing layer's own table:
  -- checked on its own, its errors name its own path)
  if handle ~= nil or not impl.isConnected(self) then check_message(message) end
  return impl.send(self, message, handle, callback)
end

--- In the master, signals the process (default "SIGTERM"); in a worker, disconnects and exits 0.
function Worker:kill(signal)
  if signal ~= nil and not signal_number(signal) then
    error(("worker:kill: bad argument #1 (signal): expected a signal name such as \"SIGTERM\" or a number, got %s")
      :format(type(signal) == "string" and signal or type(signal)), 2)
  end
  return self._impl.kill(self, signal)
end
Worker.destroy = Worker.kill

--- Graceful: stop accepting, close servers, let connections finish, then disconnect.
function Worker:disconnect()
  self._impl.disconnect(self)
  return self
end

--- True once the worker's process has ended.
function Worker:isDead() return self._impl.isDead(self) end
--- True while the channel between master and worker is open.
function Worker:isConnected() return self._impl.isConnected(self) end

return Worker
