--- UDP sockets (Node's `dgram`).
--
-- Works in any process. In a cluster worker, `socket:bind` hands the request to the
-- cluster layer (`cluster._shareBind`), which binds in the master and passes the
-- socket to the worker; `exclusive = true` keeps the bind local.
--
-- Addresses are numeric, or `"localhost"` (127.0.0.1 for udp4, ::1 for udp6).
-- @module cluster.dgram
local core = require "cluster.core"
local Emitter = require "cluster.emitter"
local loop = require "cluster.loop"
local errors = require "cluster.errors"

local type, select, error, tostring, setmetatable, getmetatable, pairs =
  type, select, error, tostring, setmetatable, getmetatable, pairs
local math_type, math_tointeger, tonumber, concat = math.type, math.tointeger, tonumber, table.concat
local defer = loop.defer
local uv_error = errors.fromUv

local M = {}

local argerror, typeerror = errors.argerror, errors.typeerror
local emit_error = errors.emit

local function to_port(v)
  if math_type(v) == "float" then v = math_tointeger(v) end
  if type(v) == "string" and v:match("^%d+$") then v = math_tointeger(tonumber(v)) end
  if math_type(v) == "integer" and v >= 0 and v <= 65535 then return v end
  return nil
end

local function check_type(fname, n, t)
  if t ~= "udp4" and t ~= "udp6" then
    argerror(fname, n, "type", 'expected "udp4" or "udp6", got ' .. tostring(t))
  end
  return t
end

--- A UDP socket: an emitter of `'listening'`, `'message'(msg, rinfo)`, `'close'`, `'error'(err)`.
-- `rinfo` is `{address=, family=, port=, size=}`.
-- @type Socket
local Socket = Emitter.mixin({})
Socket.__index = Socket
M.Socket = Socket

--- Creates a UDP socket.
-- @tparam string|table options `"udp4"`, `"udp6"` or `{type=, reuseAddr=, ipv6Only=}`
-- @tparam[opt] function onMessage a `'message'` listener
-- @treturn Socket
function M.createSocket(options, onMessage)
  local fname = "dgram.createSocket"
  local opts
  if type(options) == "string" then
    opts = { type = check_type(fname, 1, options) }
  elseif type(options) == "table" then
    opts = { type = check_type(fname, 1, options.type), reuseAddr = options.reuseAddr and true or false,
             ipv6Only = options.ipv6Only and true or false }
  else
    typeerror(fname, 1, "type", '"udp4", "udp6" or an options table', options)
  end
  if onMessage ~= nil and type(onMessage) ~= "function" then
    typeerror(fname, 2, "onMessage", "a function", onMessage)
  end
  local self = setmetatable({
    type = opts.type,
    _reuseAddr = opts.reuseAddr,
    _ipv6Only = opts.ipv6Only,
    _handle = nil,
    _state = "unbound", -- "binding", "bound", "closed"
    _queue = nil,       -- sends made while binding
  }, Socket)
  if onMessage then self:on("message", onMessage) end
  return self
end

local function default_address(self)
  return self.type == "udp6" and "::" or "0.0.0.0"
end

-- host as the kernel takes it; `default` for none or "" (Node's falsy address)
local function normalize_host(self, host, default)
  if host == nil or host == "" then host = default end
  if host == "localhost" then return self.type == "udp6" and "::1" or "127.0.0.1" end
  return host
end

--- Binds the socket: `socket:bind([port][, address][, callback])` or
-- `socket:bind({port=, address=, exclusive=}[, callback])`. Port 0 (or none) picks a free
-- port; address defaults to every interface. `callback` runs on `'listening'`; failures
-- reach `'error'` (syscall `"bind"`, with `address` and `port`) and drop the callback, as
-- in Node: a later bind that succeeds does not run it. Until the failure is reported the
-- socket is still binding (sends wait, a second bind raises).
-- @treturn Socket self
function Socket:bind(...)
  local fname = "socket:bind"
  local args, n, cb = errors.splitCallback(...)
  local opts
  if type(args[1]) == "table" then
    local o = args[1]
    opts = { port = o.port, address = o.address, exclusive = o.exclusive and true or false }
  else
    opts = { port = args[1], address = args[2], exclusive = false }
    if n > 2 then argerror(fname, n, "callback", "expected a function, got " .. type(args[n])) end
  end
  if opts.port == nil then opts.port = 0 end
  if not to_port(opts.port) then typeerror(fname, 1, "port", "a port number in 0..65535", opts.port) end
  opts.port = to_port(opts.port)
  if opts.address ~= nil and type(opts.address) ~= "string" then
    typeerror(fname, 2, "address", "a string", opts.address)
  end
  if self._state ~= "unbound" then
    error(fname .. ": the socket is " .. (self._state == "closed" and "closed" or "already bound"), 2)
  end
  opts.address = normalize_host(self, opts.address, default_address(self))
  opts.type, opts.reuseAddr, opts.ipv6Only = self.type, self._reuseAddr, self._ipv6Only
  if cb then
    -- a listener of its own, so that a failure removes this one and no other
    local function on_listening() return cb() end
    self._bindCallback = on_listening
    self:once("listening", on_listening)
  end
  self._state = "binding"
  local cluster = package.loaded["cluster"]
  if type(cluster) == "table" and cluster.isWorker and not opts.exclusive and cluster._shareBind then
    cluster._shareBind(self, opts)
    return self
  end
  local h, msg, code = core.udp_new(self.type)
  local ok = h ~= nil
  if ok then
    ok, msg, code = h:bind(opts.address, opts.port, { reuseAddr = opts.reuseAddr, ipv6Only = opts.ipv6Only })
    if not ok then h:close() end
  end
  if not ok then
    local err = uv_error(code, "bind", opts.address .. ":" .. opts.port,
                         { address = opts.address, port = opts.port })
    defer(function() self:_failBind(err) end)
    return self
  end
  self:_adoptHandle(h)
  return self
end

-- Fails sends queued while binding ({msg, port, address, callback} each): calls back
-- each with error_of(entry).
local function fail_queued(q, error_of)
  for i = 1, #q do
    if q[i][4] then q[i][4](error_of(q[i])) end
  end
end

-- The error of a send queued while binding that a close cancelled.
local function cancelled(entry)
  local address, port = entry[3], entry[2]
  return uv_error("ECANCELED", "send", address .. ":" .. port, { address = address, port = port })
end

--- Reports a failed bind: drops the bind callback, flushes queued sends with the error
-- and emits `'error'`. Internal (the cluster layer uses it when the master could not bind).
function Socket:_failBind(err)
  if self._state == "binding" then self._state = "unbound" end
  if self._bindCallback then self:off("listening", self._bindCallback) end
  self._bindCallback = nil
  local q = self._queue
  self._queue = nil
  if q then fail_queued(q, function() return err end) end
  if self._state == "closed" then return end
  emit_error(self, err)
end

--- Takes over a bound cluster.udp handle (from a local bind, or from the master when
-- the cluster layer shares the bind), starts receiving and emits `'listening'`
-- (unless `silent`). Internal.
function Socket:_adoptHandle(h, silent)
  if self._state == "closed" then
    -- closed while the cluster layer was binding: let it release the shared socket
    h:close()
    if self._onClose then self._onClose(self) end
    return
  end
  self._handle = h
  self._state = "bound"
  self._bindCallback = nil
  if self._unref then h:unref() end
  local ok, _, code = h:recv_start(function(err, data, rinfo)
    if err then return emit_error(self, err) end
    self:emit("message", data, rinfo)
  end)
  if not ok then
    defer(function() emit_error(self, uv_error(code, "recv_start")) end)
  end
  if not silent then
    defer(function() if self._state == "bound" then self:emit("listening") end end)
  end
  local q = self._queue
  self._queue = nil
  if q then
    for i = 1, #q do self:_send(q[i][1], q[i][2], q[i][3], q[i][4]) end
  end
end

function Socket:_send(msg, port, address, cb)
  local ok, _, code = self._handle:send(msg, address, port, function(err)
    if cb then
      if err then return cb(err) end -- ECANCELED: the socket closed before it went out
      return cb(nil, #msg)
    end
    if err and self._state ~= "closed" then emit_error(self, err) end
  end)
  if not ok then
    local err = uv_error(code, "send", address .. ":" .. port, { address = address, port = port })
    defer(function()
      if cb then cb(err) elseif self._state ~= "closed" then emit_error(self, err) end
    end)
  end
end

--- Sends one datagram: `socket:send(msg, port[, address][, callback])`. `msg` is a
-- string or a list of strings (sent as one datagram). The address defaults to
-- localhost; an unbound socket is bound to a random port first.
-- `callback(err, bytes)` runs once the datagram is sent (`bytes`, its size, on success;
-- `err` with code `"ECANCELED"` when the socket closed while still binding); without
-- it, failures reach `'error'` (as Node's documentation says).
-- @treturn Socket self
function Socket:send(msg, port, address, callback)
  local fname = "socket:send"
  if type(address) == "function" and callback == nil then address, callback = nil, address end
  if type(msg) == "table" then
    for i = 1, #msg do
      if type(msg[i]) ~= "string" then typeerror(fname, 1, "msg[" .. i .. "]", "a string", msg[i]) end
    end
    msg = concat(msg)
  elseif type(msg) ~= "string" then
    typeerror(fname, 1, "msg", "a string or a list of strings", msg)
  end
  local p = to_port(port)
  if not p or p == 0 then typeerror(fname, 2, "port", "a port number in 1..65535", port) end
  if address ~= nil and type(address) ~= "string" then typeerror(fname, 3, "address", "a string", address) end
  if callback ~= nil and type(callback) ~= "function" then typeerror(fname, 4, "callback", "a function", callback) end
  if self._state == "closed" then error(fname .. ": the socket is closed", 2) end
  address = normalize_host(self, address, "localhost")
  if self._state == "unbound" then self:bind({ port = 0, exclusive = true }) end
  if self._state == "binding" then
    self._queue = self._queue or {}
    self._queue[#self._queue + 1] = { msg, p, address, callback }
    return self
  end
  self:_send(msg, p, address, callback)
  return self
end

--- Closes the socket; `'close'` follows. @tparam[opt] function callback runs on `'close'`
-- @treturn Socket self
function Socket:close(callback)
  if callback ~= nil and type(callback) ~= "function" then
    typeerror("socket:close", 1, "callback", "a function", callback)
  end
  if self._state == "closed" then error("socket:close: the socket is not running", 2) end
  if callback then self:once("close", callback) end
  self._state = "closed"
  -- sends waiting for a bind that had not finished: never sent (called back before 'close')
  local q = self._queue
  self._queue = nil
  if q then defer(fail_queued, q, cancelled) end
  local h = self._handle
  self._handle = nil
  local function closed() self:emit("close") end
  -- (the descriptor closes in h:close, before the master hears of it from _onClose)
  if h then h:close(closed) else defer(closed) end
  if self._onClose then self._onClose(self) end
  return self
end

local function check_bound(self, fname)
  if self._state ~= "bound" then errors.raise(fname .. ": the socket is not bound") end
  return self._handle
end

--- The bound address `{address=, family=, port=}`. Raises when the socket is not bound.
function Socket:address()
  local a, msg = check_bound(self, "socket:address"):getsockname()
  if not a then error("socket:address: " .. msg, 2) end
  return a
end

-- The argument of an option setter: a flag (any value, as in Node) or an integer.
local function flag(_, v) return v and true or false end
local function integer(fname, v, name)
  local n = math_type(v) == "float" and math_tointeger(v) or v
  if math_type(n) ~= "integer" then typeerror(fname, 1, name, "an integer", v) end
  return n
end

local function option(fname, method, arg, name)
  return function(self, v)
    v = arg(fname, v, name)
    local ok, _, code = check_bound(self, fname)[method](self._handle, v)
    if not ok then error(uv_error(code, fname:match(":(.*)")), 2) end
    return self
  end
end

--- Allows sending to broadcast addresses. @tparam boolean flag
Socket.setBroadcast = option("socket:setBroadcast", "set_broadcast", flag)
--- Sets the unicast TTL (1..255). @tparam integer ttl
Socket.setTTL = option("socket:setTTL", "set_ttl", integer, "ttl")
--- Sets the multicast TTL (0..255). @tparam integer ttl
Socket.setMulticastTTL = option("socket:setMulticastTTL", "set_multicast_ttl", integer, "ttl")
--- Enables multicast loopback. @tparam boolean flag
Socket.setMulticastLoopback = option("socket:setMulticastLoopback", "set_multicast_loop", flag)

local function membership(fname, join)
  return function(self, group, iface)
    if type(group) ~= "string" then typeerror(fname, 1, "group", "a string", group) end
    if iface ~= nil and type(iface) ~= "string" then typeerror(fname, 2, "interface", "a string", iface) end
    local ok, _, code = check_bound(self, fname):set_membership(group, iface, join)
    if not ok then error(uv_error(code, fname:match(":(.*)")), 2) end
    return self
  end
end

--- Joins a multicast group. @tparam string group @tparam[opt] string interface
Socket.addMembership = membership("socket:addMembership", true)
--- Leaves a multicast group. @tparam string group @tparam[opt] string interface
Socket.dropMembership = membership("socket:dropMembership", false)

-- Socket:unref() / Socket:ref(): whether the open socket keeps the loop alive
loop.refMethods(Socket)

--- Wraps a bound cluster.udp handle (received over the IPC channel) as a Socket,
-- already receiving. Internal.
-- @param udp a cluster.udp userdata
-- @tparam[opt] string type `"udp4"` or `"udp6"` (default: from the handle's address)
function M._wrapUdp(udp, typ)
  local mt = getmetatable(udp)
  if type(mt) ~= "table" or mt.__name ~= "cluster.udp" then
    typeerror("dgram._wrapUdp", 1, "udp", "a cluster.udp handle", udp)
  end
  if typ == nil then
    local a = udp:getsockname()
    typ = a and a.family == "IPv6" and "udp6" or "udp4"
  end
  local self = M.createSocket(typ)
  self:_adoptHandle(udp, true)
  return self
end

return M
