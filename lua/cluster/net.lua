--- TCP and unix-socket servers and client sockets (Node's `net`).
--
-- Works in any process. In a cluster worker, `server:listen` hands the request to
-- the cluster layer (`cluster._shareListen`), which shares the port through the
-- master; `exclusive = true` keeps the listen local.
--
-- Host names: `net.connect` resolves any host name (an IPv4 result first);
-- `server:listen` takes numeric addresses and `"localhost"` (127.0.0.1). With no
-- host, a server listens on `::` (IPv4 too, dual stack) or, without IPv6, `0.0.0.0`.
-- @module cluster.net
local core = require "cluster.core"
local Emitter = require "cluster.emitter"
local loop = require "cluster.loop"
local errors = require "cluster.errors"
local idle = require "cluster.idle_timeout"

local type, select, error, tostring, tonumber, setmetatable, getmetatable, pairs =
  type, select, error, tostring, tonumber, setmetatable, getmetatable, pairs
local math_type, math_tointeger, tremove = math.type, math.tointeger, table.remove
local defer = loop.defer
-- the hot paths call these as plain functions: no method lookup through a metatable
local emit = Emitter.emit
local stream_methods = core.stream_methods
local ip_family = core.ip_family
local read_start, read_soon, stream_write, write_queue_size, close_handle, close_when_sent, stream_accept =
  stream_methods.read_start, stream_methods.read_soon, stream_methods.write,
  stream_methods.write_queue_size, stream_methods.close, stream_methods.close_when_sent,
  stream_methods.accept

local M = {}

-- A socket's write() returns false once this many bytes wait in its queue (Node's default).
local HIGH_WATER_MARK = 16 * 1024
local DEFAULT_BACKLOG = 511

-- ---------------------------------------------------------------------------
-- helpers

local argerror, typeerror = errors.argerror, errors.typeerror
local uv_error, emit_error = errors.fromUv, errors.emit

-- A port: an integer, or a string of digits, in 0..65535; nil if v is not one.
local function to_port(v)
  if math_type(v) == "float" then v = math_tointeger(v) end
  if type(v) == "string" and v:match("^%d+$") then v = math_tointeger(tonumber(v)) end
  if math_type(v) == "integer" then return v end
  return nil
end

local function check_port(fname, n, v)
  local port = to_port(v)
  if port == nil then typeerror(fname, n, "port", "a port number", v) end
  if port < 0 or port > 65535 then argerror(fname, n, "port", "must be in 0..65535, got " .. tostring(v)) end
  return port
end

-- A listen backlog: an integer (or a string of digits) in 0..2^31-1, as listen(2) takes.
local function check_backlog(fname, n, v)
  local backlog = to_port(v)
  if backlog == nil then typeerror(fname, n, "backlog", "an integer", v) end
  if backlog < 0 or backlog > 0x7fffffff then
    argerror(fname, n, "backlog", "must be in 0..2147483647, got " .. tostring(v))
  end
  return backlog
end

local function kind_of(stream)
  local mt = getmetatable(stream)
  local name = type(mt) == "table" and mt.__name
  if name == "cluster.tcp" then return "tcp" end
  if name == "cluster.pipe" then return "pipe" end
  return nil
end

-- A unix socket path: libuv (1.44) takes names up to their first NUL, so a Linux
-- abstract name ("\0name") would bind or reach a different socket; refused instead.
local function check_path(fname, n, path)
  if path:find("\0", 1, true) then
    argerror(fname, n, "path", "must not contain a NUL byte (abstract socket names are not supported)")
  end
end

-- "localhost" is 127.0.0.1 without asking the resolver (the C core does the same), so
-- that errors name the address tried, as Node's do.
local function numeric_localhost(host)
  if host == "localhost" then return "127.0.0.1" end
  return host
end

local function host_port(host, port)
  return host .. ":" .. port
end

-- ---------------------------------------------------------------------------
-- Socket

--- A TCP or unix-socket connection: an emitter of `'connect'`, `'data'(chunk)`,
-- `'end'`, `'drain'`, `'error'(err)`, `'close'(hadError)`.
-- Fields `remoteAddress`, `remotePort`, `remoteFamily`, `localAddress`, `localPort`,
-- `bytesRead`, `bytesWritten`, `connecting`, `destroyed`.
-- @type Socket
local Socket = Emitter.mixin({})
Socket.__index = Socket
M.Socket = Socket

local start_reading, schedule_flush, closed, closed_soon, connection_listener, accept_stream

-- every socket's buffer of unread chunks until it needs one of its own (never written)
local NO_CHUNKS = {}

-- A new 'data' listener gets what was buffered, or starts the reading that nobody
-- wanted before; a socket already reading with nothing buffered needs no flush (no
-- deferred call, so no timer, for every accepted connection).
local function on_new_listener(self, name)
  -- (a socket at its end is not reading: _eof implies not _reading)
  if name == "data" and not self._paused and (not self._reading or self._buffer[1]) then
    schedule_flush(self)
  end
end

-- Every field's starting value lives in the class, so a socket made with Socket.new
-- (a client) holds only the fields it has changed. An accepted connection's table is
-- built in one constructor instead (socket_from_stream), with the fields its path reads.
Socket.connecting = false
Socket.destroyed = false
Socket.bytesRead = 0
Socket.bytesWritten = 0
Socket.allowHalfOpen = false
Socket._paused = false   -- pause() was called
Socket._reading = false  -- the handle is reading
Socket._buffer = NO_CHUNKS -- chunks read while nobody took them
Socket._eof = false      -- the peer ended, 'end' not yet emitted
Socket._readEnded = false
Socket._writeEnded = false
Socket._ending = false   -- close() was called
Socket._destroySoon = false   -- destroySoon() was called
Socket._finishOnClose = false -- 'finish' comes with 'close' (destroySoon on a connected socket)
Socket._pendingBytes = 0 -- bytes of the writes made while connecting (Socket._pending)
Socket._endCallbacks = false -- close()'s callbacks, waiting for 'finish'
Socket._owed = false     -- callbacks owed an answer before 'error' and 'close': { {fn, err}, ... }
Socket._needDrain = false
Socket._idleMs = false   -- setTimeout's milliseconds, while it is on
Socket._idleTimer = false
Socket._onNewListener = on_new_listener
Socket._calm = false     -- see below

-- A calm socket is in the state nearly every connection spends its life in: connected,
-- reading, with its 'data' chunks going straight to the listeners and its writes
-- straight to the handle. It is not paused, connecting, ending, ended or destroyed,
-- holds no buffered chunks or writes waiting for the connection, and has no idle timer.
-- While _calm is true, reading a chunk, writing, destroySoon() and adding a listener
-- take short paths that test that one field instead of each of those states (the
-- listener hook has nothing to do: the socket reads already and holds nothing).
-- Whatever leaves that state unsettles the socket first; reading again (after resume(),
-- or once a client has connected) asks is_calm() whether it is back. _calm is a
-- promise, never a requirement: a socket that is not calm takes the general paths,
-- which handle every state (one that ever had an idle timer keeps it, and stays there).
local function is_calm(self)
  return self._reading and self._handle and not (self._paused or self.destroyed or self.connecting
    or self._ending or self._eof or self._readEnded or self._writeEnded or self._buffer[1]
    or self._pending or self._idleMs or self._idleTimer)
end

local function settle(self)
  self._calm = true
  self._onNewListener = false
end

local function unsettle(self)
  self._calm = false
  self._onNewListener = on_new_listener
end

local function new_socket(options)
  local self = setmetatable({}, Socket)
  if options and options.allowHalfOpen then self.allowHalfOpen = true end
  return self
end

-- The address every connection a server accepts has as its local end: the server's
-- own, unless it listens on every interface (then false, as for a unix socket).
local function local_end(server)
  local ends = server._localEnd
  if ends == nil then
    ends = false
    local h = server._handle
    if h and kind_of(h) == "tcp" then
      local a = h:getsockname()
      if a and a.address ~= "0.0.0.0" and a.address ~= "::" then ends = a end
    end
    server._localEnd = ends
  end
  return ends
end

local UNKNOWN_END = {} -- no address known: the kernel is asked

-- Reads a connected TCP stream's addresses into the socket's fields; the accepting
-- server's own address spares asking the kernel for the local end.
local function set_addresses(self, server)
  local h = self._handle
  if kind_of(h) ~= "tcp" then return end
  local ends = server and getmetatable(server) == M.Server and local_end(server) or UNKNOWN_END
  self.remoteAddress, self.remotePort, self.remoteFamily,
    self.localAddress, self.localPort, self.localFamily = h:addresses(ends.address, ends.port, ends.family)
end

-- Wraps a connected stream userdata: `options` (allowHalfOpen, pauseOnConnect) are
-- those of `server` when a server accepted it. The addresses, when the caller knows
-- them (remote address, port, family, local address, port, family), save asking the
-- kernel.
local function socket_from_stream(stream, options, server, remoteAddress, remotePort, remoteFamily,
                                  localAddress, localPort, localFamily)
  local paused = options and options.pauseOnConnect or false
  -- One constructor with the fields a connection's short paths read and write (a
  -- field they miss costs a look in the class): the table is sized once, at 16 slots,
  -- and holds only what the connection changes. The rest stay the class's defaults.
  -- Unless paused, a new connection reads at once and is calm (settle()): nothing else
  -- that is_calm() checks holds yet.
  local reading = not paused
  local self = setmetatable({
    _handle = stream, server = server,
    remoteAddress = remoteAddress, remotePort = remotePort, remoteFamily = remoteFamily,
    localAddress = localAddress, localPort = localPort, localFamily = localFamily,
    bytesRead = 0, bytesWritten = 0, _listeners = false, destroyed = false,
    _reading = reading, _calm = reading, _onNewListener = paused and on_new_listener or false,
  }, Socket)
  if options and options.allowHalfOpen then self.allowHalfOpen = true end
  if not remoteAddress then set_addresses(self, server) end
  if paused then
    self._paused = true
  else -- (start_reading, written out for a new connection)
    local ok, _, code = read_start(stream, Socket._read, self)
    if not ok then
      self._reading = false
      unsettle(self)
      self:destroy(uv_error(code, "read"))
    end
  end
  return self
end

--- Creates an unconnected socket; see `Socket:connect`.
-- @tparam[opt] table options `{allowHalfOpen=}`
-- @treturn Socket
function Socket.new(options)
  if options ~= nil and type(options) ~= "table" then
    typeerror("net.Socket.new", 1, "options", "a table or nil", options)
  end
  return new_socket(options)
end

-- Starts the handle reading into Socket._read, if the socket should read (or destroys
-- the socket if it can't).
function start_reading(self)
  if self._reading or self._paused or self.destroyed or self._eof or self._readEnded
     or self.connecting or not self._handle then
    return
  end
  local ok, _, code = read_start(self._handle, Socket._read, self)
  if not ok then return self:destroy(uv_error(code, "read")) end
  self._reading = true
  if is_calm(self) then settle(self) end
end

local function stop_reading(self)
  if not self._reading then return end
  self._reading = false
  if self._calm then unsettle(self) end
  if not self.destroyed then self._handle:read_stop() end
end

local function on_end(self)
  if self._readEnded then return end
  self._eof = false
  self._readEnded = true
  self:emit("end")
  if self.destroyed then return end
  if self._writeEnded then
    self:destroy()
  elseif not self.allowHalfOpen then
    self:close()
  end
end

-- Hands buffered chunks to 'data' listeners, then reads on (or ends).
local function flush(self)
  self._flushScheduled = false
  local buf = self._buffer
  while buf[1] and not self._paused and not self.destroyed and self:listenerCount("data") > 0 do
    emit(self, "data", tremove(buf, 1))
  end
  if buf[1] or self._paused or self.destroyed then return end
  if self._eof then on_end(self) else start_reading(self) end
end

function schedule_flush(self)
  if self._flushScheduled then return end
  self._flushScheduled = true
  defer(flush, self)
end

-- The read callback's general path: every state.
local function read_any(self, err, chunk)
  if self.destroyed then return end
  if err then return self:destroy(err) end
  if self._idleMs then idle.touch(self) end
  if chunk == nil then
    self._reading = false -- libuv stops reading at the end
    if self._calm then unsettle(self) end
    self._eof = true
    if not self._buffer[1] then on_end(self) end
    return
  end
  self.bytesRead = self.bytesRead + #chunk
  -- 'data' goes to its listeners unless nobody listens, the socket is paused or older
  -- chunks wait: then the chunk is kept and reading stops, backpressure to the peer
  local buf = self._buffer
  local all = self._listeners
  local listener = all and all.data
  if listener and not self._paused and not buf[1] then
    listener(chunk)
  else
    if buf == NO_CHUNKS then
      buf = {}
      self._buffer = buf
    end
    buf[#buf + 1] = chunk
    stop_reading(self)
  end
end

-- read callback: chunk, or nil at the end of the stream (then err may be an error).
-- A calm socket's chunk goes straight to its 'data' listeners, when it has any.
function Socket:_read(err, chunk)
  if chunk and self._calm then
    local all = self._listeners
    local listener = all and all.data
    if listener then
      self.bytesRead = self.bytesRead + #chunk
      return listener(chunk)
    end
  end
  return read_any(self, err, chunk)
end

--- Stops reading: no `'data'` until `resume()`. @treturn Socket self
function Socket:pause()
  self._paused = true
  stop_reading(self)
  return self
end

--- Reads again after `pause()` (from the next loop turn). @treturn Socket self
function Socket:resume()
  self._paused = false
  schedule_flush(self)
  return self
end

--- @treturn boolean whether the socket is paused
function Socket:isPaused() return self._paused end

-- Asks for 'drain' once libuv's queue is empty: an empty write with a callback runs
-- after all the data queued before it.
local function request_drain(self)
  if self._drainMarked then return end
  self._needDrain = true
  self._drainMarked = true
  local mark = self._onDrainMark
  if not mark then
    mark = function(err) self:_drainMark(err) end
    self._onDrainMark = mark
  end
  if not self._handle:write("", mark) then self._drainMarked = false end
end

function Socket:_drainMark(err)
  self._drainMarked = false
  if err or self.destroyed or self._ending then return end -- (no 'drain' after close(), as Node)
  if self._handle:write_queue_size() > 0 then return request_drain(self) end
  if self._needDrain then
    self._needDrain = false
    self:emit("drain")
  end
end

local function destroyed_error(call)
  return errors.new("ERR_STREAM_DESTROYED", call, "Cannot call " .. call .. " after a stream was destroyed")
end

-- Has `callback(err)` run when the socket's close is reported, before 'finish', 'error'
-- and 'close' (Node calls them first too). Only for a socket not yet destroyed, or
-- being destroyed now: a destroyed one's close may have been reported already.
local function owe(self, callback, err)
  local owed = self._owed
  if not owed then
    owed = {}
    self._owed = owed
  end
  owed[#owed + 1] = { callback, err }
end

-- A write the socket cannot take, after close() or destroy(): false, and the callback
-- gets the error. After close() the socket is destroyed with it ('error', then
-- 'close'), as Node's write after end does; once the peer has ended a socket that is
-- not half-open, the error is Node's EPIPE.
local function refuse_write(self, callback)
  local err
  if self._readEnded and not self.allowHalfOpen then
    err = uv_error("EPIPE", "write")
    err.message = "This socket has been ended by the other party"
  elseif self.destroyed then
    err = destroyed_error("write")
  else
    err = errors.new("ERR_STREAM_WRITE_AFTER_END", "write", "write after end")
  end
  if self.destroyed then
    if callback then defer(callback, err) end
  else
    if callback then owe(self, callback, err) end
    self:destroy(err)
  end
  return false
end

-- After the handle's write of `data` (with callback `cb`): `queued` is what libuv
-- still holds, or nil (and the error's `code`) when the write failed.
local function wrote(self, data, cb, queued, code)
  if not queued then
    local err = uv_error(code, "write")
    if cb then owe(self, cb, err) end
    self:destroy(err)
    return false
  end
  self.bytesWritten = self.bytesWritten + #data
  if queued >= HIGH_WATER_MARK then
    request_drain(self)
    return false
  end
  return true
end

local function do_write(self, data, cb)
  if self._idleMs then idle.touch(self) end
  local queued, _, code = stream_write(self._handle, data, cb)
  return wrote(self, data, cb, queued, code)
end

--- Writes data. Returns false when the caller should wait for `'drain'` before
-- writing more (the data is still queued and will be sent). A write after `close()`
-- fails as Node's write after end: its callback gets `ERR_STREAM_WRITE_AFTER_END` (or
-- `EPIPE` once the peer has ended a socket that is not half-open) and the socket is
-- destroyed with that error; after `destroy()`, the callback gets `ERR_STREAM_DESTROYED`.
-- @tparam string data
-- @tparam[opt] function callback `callback(err)` once the data is handed to the kernel
-- @treturn boolean
function Socket:write(data, callback)
  if self._calm and callback == nil then
    -- the handle's write checks the type: false, and nothing written, unless a string
    local queued, _, code = stream_write(self._handle, data)
    -- wrote()'s usual case inline (a keep-alive request: 64 VM instructions, not 74)
    if queued == 0 then
      self.bytesWritten = self.bytesWritten + #data
      return true
    end
    if queued ~= false then return wrote(self, data, nil, queued, code) end
  end
  if type(data) ~= "string" then typeerror("socket:write", 1, "data", "a string", data) end
  if callback ~= nil and type(callback) ~= "function" then
    typeerror("socket:write", 2, "callback", "a function", callback)
  end
  if self.destroyed or self._ending then return refuse_write(self, callback) end
  if self.connecting or not self._handle then
    self._pending = self._pending or {}
    self._pending[#self._pending + 1] = { data, callback }
    self._pendingBytes = self._pendingBytes + #data
    if self._pendingBytes >= HIGH_WATER_MARK then
      self._needDrain = true
      return false
    end
    return true
  end
  return do_write(self, data, callback)
end

local function do_shutdown(self)
  local ok, _, code = self._handle:shutdown(function(err)
    if self.destroyed then return end
    if err and err.code ~= "ENOTCONN" then return self:destroy(err) end
    self._writeEnded = true
    local callbacks = self._endCallbacks
    if callbacks then
      self._endCallbacks = false
      for i = 1, #callbacks do callbacks[i]() end
    end
    self:emit("finish")
    if self.destroyed then return end
    if self._readEnded or err then self:destroy() end
  end)
  if not ok then
    if code == "ENOTCONN" then return self:destroy() end
    self:destroy(uv_error(code, "shutdown"))
  end
end

local function add_end_callback(self, callback)
  local callbacks = self._endCallbacks
  if not callbacks then
    callbacks = {}
    self._endCallbacks = callbacks
  end
  callbacks[#callbacks + 1] = callback
end

-- close() on a socket that is ending or destroyed already (Node's end() again): `data`
-- is a write after the end, whose error the callback gets; without data, the callback
-- runs on the 'finish' still to come, or with the error saying why none will.
local function close_again(self, data, callback)
  if data ~= nil then
    refuse_write(self, callback)
  elseif callback then
    if self._writeEnded then
      defer(callback, errors.new("ERR_STREAM_ALREADY_FINISHED", "end", "Cannot call end after a stream was finished"))
    elseif self.destroyed then
      defer(callback, destroyed_error("end"))
    else
      add_end_callback(self, callback)
    end
  end
  return self
end

--- Ends the connection gracefully: writes `data` if given, then everything queued,
-- then closes the writing side. The socket closes once the peer has ended too.
-- (Node's `socket.end`; also available as `socket["end"]`.)
-- @tparam[opt] string data
-- @tparam[opt] function callback runs on `'finish'` (writing side closed), or with the
--   error when the socket is destroyed first (Node's)
-- @treturn Socket self
function Socket:close(data, callback)
  if type(data) == "function" and callback == nil then data, callback = nil, data end
  if data ~= nil and type(data) ~= "string" then typeerror("socket:close", 1, "data", "a string or nil", data) end
  if callback ~= nil and type(callback) ~= "function" then
    typeerror("socket:close", 2, "callback", "a function", callback)
  end
  if self.destroyed or self._ending then return close_again(self, data, callback) end
  -- (the callback first: a write that fails destroys the socket, which answers it)
  if callback then add_end_callback(self, callback) end
  if data ~= nil then self:write(data) end
  self._ending = true
  if self._calm then unsettle(self) end
  if self._handle and not self.connecting and not self.destroyed then do_shutdown(self) end -- the write may have failed
  return self
end
Socket["end"] = Socket.close

--- Closes the connection as soon as everything written so far has reached the kernel,
-- without waiting for the peer to end its side (Node's `socket.destroySoon`, which is
-- what an HTTP server does after a `Connection: close` response). Later writes fail as
-- after `close()`. Emits `'finish'` then `'close'`. A socket still connecting ends
-- gracefully instead and is destroyed once its writing side is closed.
-- @treturn Socket self
function Socket:destroySoon()
  -- nothing written waits in the handle's queue: close now, the bytes the core holds
  -- from this turn's writes sent with the FIN ('finish' comes with 'close')
  if self._calm and close_when_sent(self._handle, closed_soon, self) then
    self._calm = false -- (its hook stays off: a listener added now has nothing to read)
    self.destroyed = true
    self._reading = false
    return self
  end
  if self.destroyed or self._destroySoon then return self end
  self._destroySoon = true
  if self._calm then unsettle(self) end
  if self._ending or self.connecting or not self._handle then
    -- ending already (close() was called), or not connected yet: end gracefully, and
    -- destroy once the writing side is closed (Node's order)
    if self._writeEnded then return self:destroy() end
    self:once("finish", function() self:destroy() end)
    return self:close()
  end
  self._ending = true
  self._finishOnClose = true
  -- closing the descriptor sends the FIN after the data the kernel holds; libuv's
  -- queue is written first (an empty write's callback runs after everything queued)
  local h = self._handle
  if write_queue_size(h) > 0 and stream_write(h, "", function(err) self:destroy(err) end) then
    return self
  end
  return Socket.destroy(self)
end

-- The end of a socket, once its handle has closed (once per connection): the callbacks
-- it owes, 'finish' when it comes with 'close', the server's count, 'error' when
-- destroyed with one, 'close'. The events with nobody listening cost no call.
local function report_closed(self, err, finish)
  local owed = self._owed
  if owed then
    self._owed = false
    for i = 1, #owed do owed[i][1](owed[i][2]) end
  end
  local all = self._listeners
  if finish and not err and all and all.finish then emit(self, "finish") end
  local server = self.server
  if server then
    server._connectionCount = server._connectionCount - 1
    if server._closing then server:_maybeClosed() end
  end
  if err then emit_error(self, err) end
  all = self._listeners -- ('finish' listeners may have changed them)
  local on_close = all and all.close
  if on_close then on_close(err and true or false) end
end

-- destroy()'s close callback; `err`: sending what the core held from this turn's
-- writes failed at the close
function closed(self, err)
  local destroy_error = self._destroyError
  if destroy_error then err = destroy_error end
  return report_closed(self, err, self._finishOnClose and not err)
end

-- the close callback of destroySoon() on a calm socket: 'finish' too, unless sending
-- what was written failed (`err`)
function closed_soon(self, err)
  return report_closed(self, err or false, not err)
end

-- On destroy: the writes still waiting for the connection, and close()'s callbacks
-- (unless 'finish' comes with 'close'), get `err` or ERR_STREAM_DESTROYED before the
-- socket's last events (Node's).
local function fail_waiting(self, err)
  local pending = self._pending
  if pending then
    self._pending, self._pendingBytes = nil, 0
    local werr = err or destroyed_error("write")
    for i = 1, #pending do
      if pending[i][2] then owe(self, pending[i][2], werr) end
    end
  end
  local callbacks = self._endCallbacks
  if callbacks then
    self._endCallbacks = false
    local eerr = err
    if not eerr and not self._finishOnClose then eerr = destroyed_error("end") end
    for i = 1, #callbacks do owe(self, callbacks[i], eerr) end
  end
end

--- Closes the connection at once, dropping unsent data. With `err`, `'error'(err)`
-- is emitted before `'close'`.
-- @tparam[opt] table err an error object
-- @treturn Socket self
function Socket:destroy(err)
  if self.destroyed then return self end
  self.destroyed = true
  if self.connecting then self.connecting = false end
  if self._reading then self._reading = false end
  if self._calm then unsettle(self) end
  if err then self._destroyError = err end
  if self._idleTimer then idle.stop(self, true) end
  if self._pending or self._endCallbacks then fail_waiting(self, err) end
  local h = self._handle
  if h then close_handle(h, closed, self) else defer(closed, self) end
  return self
end

-- connect callback
function Socket:_connected(err)
  if self.destroyed then return end
  if err then
    if err.syscall == "getaddrinfo" and (err.code == "EAI_NONAME" or err.code == "EAI_NODATA") then
      -- Node's name for "no such host"
      err.code = "ENOTFOUND"
      err.hostname = err.address
      err.message = "getaddrinfo ENOTFOUND " .. tostring(err.address)
    end
    return self:destroy(err)
  end
  self.connecting = false
  set_addresses(self)
  if self._idleMs then idle.touch(self) end
  local pending = self._pending
  self._pending, self._pendingBytes = nil, 0
  local drain = self._needDrain
  self._needDrain = false
  if pending then
    for i = 1, #pending do
      do_write(self, pending[i][1], pending[i][2])
      if self.destroyed then return end
    end
  end
  if drain then request_drain(self) end
  if self._ending then do_shutdown(self) end
  if self.destroyed then return end
  if not self._paused then start_reading(self) end
  self:emit("connect")
  self:emit("ready")
end

-- A TCP connect's own end (Node's localAddress and localPort): an IP address and a
-- port, each optional; checked here, bound before connecting.
local function check_local_end(fname, opts)
  local addr = opts.localAddress
  if addr ~= nil and (type(addr) ~= "string" or ip_family(addr) == 0) then
    argerror(fname, 1, "localAddress", "expected an IP address, got " ..
      (type(addr) == "string" and string.format("%q", addr) or type(addr)))
  end
  if opts.localPort ~= nil then
    local port = to_port(opts.localPort)
    if port == nil or port < 0 or port > 65535 then typeerror(fname, 1, "localPort", "a port number", opts.localPort) end
    opts.localPort = port
  end
end

local function normalize_connect(fname, ...)
  local n = select("#", ...)
  local a1, a2, a3 = ...
  local opts, cb
  if type(a1) == "table" then
    opts = {}
    for k, v in pairs(a1) do opts[k] = v end
    cb = a2
    if opts.path == nil then
      opts.port = check_port(fname, 1, opts.port)
      if opts.host ~= nil and type(opts.host) ~= "string" then typeerror(fname, 1, "host", "a string", opts.host) end
      check_local_end(fname, opts)
    elseif type(opts.path) ~= "string" then
      typeerror(fname, 1, "path", "a string", opts.path)
    end
  elseif to_port(a1) then
    opts = { port = check_port(fname, 1, a1) }
    if type(a2) == "function" and n == 2 then
      cb = a2
    else
      if a2 ~= nil and type(a2) ~= "string" then typeerror(fname, 2, "host", "a string", a2) end
      opts.host, cb = a2, a3
    end
  elseif type(a1) == "string" then
    opts, cb = { path = a1 }, a2
  else
    typeerror(fname, 1, "port", "a port number, a path or an options table", a1)
  end
  if cb ~= nil and type(cb) ~= "function" then typeerror(fname, n, "callback", "a function", cb) end
  if opts.path then check_path(fname, 1, opts.path) end
  if opts.host == "" then opts.host = nil end -- (Node's falsy host: localhost)
  return opts, cb
end

--- Connects the socket: `socket:connect(port[, host][, callback])`,
-- `socket:connect(path[, callback])` or `socket:connect({port=, host=, path=}[, callback])`.
-- Host defaults to `"localhost"`; `callback` runs on `'connect'`.
-- @treturn Socket self
function Socket:connect(...)
  local opts, cb = normalize_connect("socket:connect", ...)
  return self:_connect(opts, cb)
end

function Socket:_connect(opts, cb)
  if self._handle or self.destroyed then
    errors.raise("socket:connect: the socket is already connected or connecting")
  end
  if cb then self:once("connect", cb) end
  self.connecting = true
  local on_connect = function(err) self:_connected(err) end
  local h, host, ok, _, code
  if opts.path then
    h = core.pipe_new()
    ok, _, code = h:connect(opts.path, on_connect)
  else
    host = numeric_localhost(opts.host or "localhost")
    h = core.tcp_new()
    if self._noDelay then h:nodelay(true) end
    if self._keepAlive then h:keepalive(true, self._keepAlive) end
    if opts.localAddress or opts.localPort then
      -- without an address, the port is bound on every interface of the host's family
      local addr = opts.localAddress or (ip_family(host) == 6 and "::" or "0.0.0.0")
      local port = opts.localPort or 0
      local bound
      bound, _, code = h:bind(addr, port)
      if not bound then
        self._handle = h
        self:destroy(uv_error(code, "bind", host_port(addr, port), { address = addr, port = port }))
        return self
      end
    end
    ok, _, code = h:connect(host, opts.port, on_connect)
  end
  self._handle = h
  if self._unref then h:unref() end
  if not ok then
    local detail = opts.path or host_port(host, opts.port)
    self:destroy(uv_error(code, "connect", detail,
      opts.path and { path = opts.path } or { address = host, port = opts.port }))
  end
  return self
end

--- Disables (or enables) Nagle's algorithm. @tparam[opt=true] boolean noDelay @treturn Socket self
function Socket:setNoDelay(noDelay)
  if noDelay == nil then noDelay = true end
  self._noDelay = noDelay and true or false
  local h = self._handle
  if h and not self.destroyed and kind_of(h) == "tcp" then h:nodelay(self._noDelay) end
  return self
end

--- Enables TCP keep-alive. @tparam boolean enable
-- @tparam[opt] number initialDelay milliseconds before the first probe (0: the system's default)
-- @treturn Socket self
function Socket:setKeepAlive(enable, initialDelay)
  if initialDelay ~= nil and type(initialDelay) ~= "number" then
    typeerror("socket:setKeepAlive", 2, "initialDelay", "a number of milliseconds", initialDelay)
  end
  local secs = initialDelay and initialDelay > 0 and math.max(1, math.ceil(initialDelay / 1000)) or 7200
  self._keepAlive = enable and math.tointeger(secs) or false
  local h = self._handle
  if h and not self.destroyed and kind_of(h) == "tcp" then h:keepalive(enable and true or false, self._keepAlive or 1) end
  return self
end

--- Emits `'timeout'` after `ms` milliseconds without activity (bytes read, a write, a
-- queued write draining), once per idle spell; the socket stays open (Node's
-- `socket.setTimeout`). `ms` = 0 turns it off. `callback` is added as a one-time
-- `'timeout'` listener (with 0, removed). Sets `socket.timeout`.
-- @tparam number ms
-- @tparam[opt] function callback
-- @treturn Socket self
function Socket:setTimeout(ms, callback)
  if type(ms) ~= "number" then typeerror("socket:setTimeout", 1, "timeout", "a number of milliseconds", ms) end
  if ms ~= ms or ms < 0 or ms >= 2 ^ 53 then
    argerror("socket:setTimeout", 1, "timeout", "must be >= 0 and < 2^53 milliseconds, got " .. tostring(ms))
  end
  if callback ~= nil and type(callback) ~= "function" then
    typeerror("socket:setTimeout", 2, "callback", "a function", callback)
  end
  ms = math_tointeger(math.ceil(ms))
  self.timeout = ms
  if ms == 0 then
    -- (the timer stays for the next setTimeout, and the socket on the general paths)
    if self._idleTimer then idle.stop(self) end
    if callback then self:off("timeout", callback) end
    return self
  end
  if callback then self:once("timeout", callback) end
  if not self.destroyed then
    if self._calm then unsettle(self) end
    idle.start(self, ms)
  end
  return self
end

--- The local address `{address=, family=, port=}` (nil for unix sockets or when not connected).
function Socket:address()
  local h = self._handle
  if not h or self.destroyed or kind_of(h) ~= "tcp" then return nil end
  return (h:getsockname())
end

-- Socket:unref() / Socket:ref(): whether the open socket keeps the loop alive
loop.refMethods(Socket)

--- Opens a connection: `net.connect(port[, host][, callback])`, `net.connect(path[, callback])`
-- or `net.connect({port=, host=, path=, allowHalfOpen=, localAddress=, localPort=}[, callback])`.
-- @treturn Socket
function M.connect(...)
  local opts, cb = normalize_connect("net.connect", ...)
  return new_socket(opts):_connect(opts, cb)
end
M.createConnection = M.connect

--- Whether `s` is an IP address: 4 (IPv4), 6 (IPv6) or 0 (anything else), as Node's
-- `net.isIP`. @treturn integer
function M.isIP(s)
  if type(s) ~= "string" then return 0 end
  return ip_family(s)
end
--- @treturn boolean whether `s` is an IPv4 address
function M.isIPv4(s) return M.isIP(s) == 4 end
--- @treturn boolean whether `s` is an IPv6 address
function M.isIPv6(s) return M.isIP(s) == 6 end

--- Wraps a connected stream handle (cluster.tcp or cluster.pipe userdata, for example one
-- received over the IPC channel) as a Socket. Internal.
function M._wrapStream(stream, options)
  if not kind_of(stream) then typeerror("net._wrapStream", 1, "stream", "a cluster.tcp or cluster.pipe handle", stream) end
  if options ~= nil and type(options) ~= "table" then
    typeerror("net._wrapStream", 2, "options", "a table or nil", options)
  end
  return socket_from_stream(stream, options)
end

-- ---------------------------------------------------------------------------
-- Server

--- A TCP or unix-socket server: an emitter of `'listening'`, `'connection'(socket)`,
-- `'close'`, `'error'(err)`, `'drop'(data)`. Fields `listening`, `maxConnections`.
-- @type Server
local Server = Emitter.mixin({})
Server.__index = Server
M.Server = Server

--- Creates a server. @tparam[opt] table options `{allowHalfOpen=, pauseOnConnect=}`
-- @tparam[opt] function onConnection a `'connection'` listener
-- @treturn Server
function M.createServer(options, onConnection)
  if type(options) == "function" and onConnection == nil then options, onConnection = nil, options end
  if options ~= nil and type(options) ~= "table" then
    typeerror("net.createServer", 1, "options", "a table", options)
  end
  if onConnection ~= nil and type(onConnection) ~= "function" then
    typeerror("net.createServer", 2, "onConnection", "a function", onConnection)
  end
  options = options or {}
  local self = setmetatable({
    listening = false,
    allowHalfOpen = options.allowHalfOpen and true or false,
    pauseOnConnect = options.pauseOnConnect and true or false,
    _handle = nil,
    _connectionCount = 0,
  }, Server)
  if onConnection then self:on("connection", onConnection) end
  return self
end

local function normalize_listen(...)
  local fname = "server:listen"
  local args, n, cb = errors.splitCallback(...)
  local a1 = args[1]
  local opts
  if type(a1) == "table" then
    if n > 1 then argerror(fname, 2, "callback", "expected a function, got " .. type(args[2])) end
    if a1.port == nil and a1.path == nil then -- (as Node: it would listen nowhere in particular)
      argerror(fname, 1, "options", 'must have the field "port" or "path"')
    end
    opts = { host = a1.host, port = a1.port, path = a1.path, backlog = a1.backlog,
             exclusive = a1.exclusive and true or false, ipv6Only = a1.ipv6Only and true or false }
    if opts.path ~= nil then
      if type(opts.path) ~= "string" then typeerror(fname, 1, "path", "a string", opts.path) end
      opts.host, opts.port = nil, nil
    else
      opts.port = check_port(fname, 1, opts.port)
      if opts.host ~= nil and type(opts.host) ~= "string" then typeerror(fname, 1, "host", "a string", opts.host) end
    end
    if opts.backlog ~= nil then opts.backlog = check_backlog(fname, 1, opts.backlog) end
  elseif a1 == nil or to_port(a1) then
    opts = { port = check_port(fname, 1, a1 or 0) }
    local i = 2
    if type(args[2]) == "string" and not to_port(args[2]) then
      opts.host, i = args[2], 3
    elseif args[2] == nil and n >= 3 then
      i = 3 -- listen(port, nil, backlog)
    end
    if args[i] ~= nil then opts.backlog = check_backlog(fname, i, args[i]) end
    if n > i then argerror(fname, n, "callback", "expected a function, got " .. type(args[n])) end
  elseif type(a1) == "string" then
    opts = { path = a1 }
    if args[2] ~= nil then opts.backlog = check_backlog(fname, 2, args[2]) end
    if n > 2 then argerror(fname, n, "callback", "expected a function, got " .. type(args[n])) end
  else
    typeerror(fname, 1, "port", "a port number, a path or an options table", a1)
  end
  if opts.path then check_path(fname, 1, opts.path) end
  opts.backlog = opts.backlog or DEFAULT_BACKLOG
  if opts.host == "" then opts.host = nil end -- (Node's falsy host: every interface)
  opts.exclusive = opts.exclusive or false
  opts.ipv6Only = opts.ipv6Only or false
  return opts, cb
end

--- Starts listening: `server:listen(port[, host][, backlog][, callback])`,
-- `server:listen(path[, backlog][, callback])` or
-- `server:listen({port=, host=, path=, backlog=, exclusive=, ipv6Only=}[, callback])`.
-- Port 0 (or none) picks a free port. `callback` runs on `'listening'`; failures reach
-- `'error'` (an error object with `code`, `errno`, `syscall`, `message` and `address`/`port`
-- or `path`).
-- @treturn Server self
function Server:listen(...)
  local opts, cb = normalize_listen(...)
  if self._listenPending and self._cancelListen and not self._relisten then
    -- closed while its shared listen was under way: this listen follows once that one
    -- is undone (its 'close' first), as Node lets a server listen again after close()
    local args = table.pack(...)
    self._relisten = function() return self:listen(table.unpack(args, 1, args.n)) end
    return self
  end
  if self._handle or self.listening or self._listenPending then
    error("server:listen: the server is already listening", 2)
  end
  if cb then self:once("listening", cb) end
  self._closing, self._closeEmitted = false, false
  self._backlog = opts.backlog
  self._path = opts.path
  local cluster = package.loaded["cluster"]
  if type(cluster) == "table" and cluster.isWorker and not opts.exclusive and cluster._shareListen then
    self._listenPending, self._cancelListen = true, false
    cluster._shareListen(self, opts)
    return self
  end
  self:_listenLocal(opts)
  return self
end

-- Creates, binds and listens a handle; returns it, or nil and an error object.
local function listen_handle(self, opts, host)
  local h, ok, _, code
  local on_connection = connection_listener(self)
  if opts.path then
    h = core.pipe_new()
    ok, _, code = h:bind(opts.path)
  else
    h = core.tcp_new()
    ok, _, code = h:bind(host, opts.port, { ipv6Only = opts.ipv6Only })
  end
  if ok then ok, _, code = h:listen(opts.backlog, on_connection) end
  if not ok then
    h:close()
    local fields = opts.path and { path = opts.path } or { address = host, port = opts.port }
    return nil, uv_error(code, "listen", opts.path or host_port(host, opts.port), fields), "bind"
  end
  return h
end

function Server:_listenLocal(opts)
  local h, err
  if opts.path or opts.host then
    h, err = listen_handle(self, opts, numeric_localhost(opts.host))
  else
    -- Node: the IPv6 any-address (dual stack) when the system has IPv6, else IPv4's
    h, err = listen_handle(self, opts, "::")
    if not h and err.code ~= "EADDRINUSE" and err.code ~= "EACCES" then
      h, err = listen_handle(self, opts, "0.0.0.0")
    end
  end
  if not h then
    defer(function() emit_error(self, err) end)
    return
  end
  self:_setHandle(h)
  -- a worker's exclusive server is still reported to the master ('listening')
  local cluster = package.loaded["cluster"]
  if type(cluster) == "table" and cluster.isWorker and cluster._reportListening then
    cluster._reportListening(opts.path or h:getsockname(), opts.path)
  end
end

function Server:_setHandle(h)
  self._handle = h
  self._localEnd = nil
  self.listening = true
  if self._unref then h:unref() end
  defer(function() if self.listening then self:emit("listening") end end)
end

--- Whether the server holds `maxConnections` connections already (Node's
-- `server.maxConnections`: nil, the default, is no limit). A value that is not a number
-- raises, after `settle(...)` has disposed of the connection at hand. Internal: the
-- cluster layer refuses a round-robin connection to a full server, and the master hands
-- it to another worker.
function Server:_full(settle, ...)
  local max = self.maxConnections
  if max == nil then return false end
  if type(max) ~= "number" or max ~= max then
    settle(...)
    error("server.maxConnections: expected a number or nil, got " .. (type(max) == "number" and "nan" or type(max)), 0)
  end
  return self._connectionCount >= max
end

-- A connection over maxConnections: closed at once, and 'drop' tells the server who it
-- was (Node's fields; none for a unix socket's connection).
local function drop(self, stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort)
  local data
  if remoteAddress ~= nil then
    data = { remoteAddress = remoteAddress, remotePort = remotePort, remoteFamily = remoteFamily,
             localAddress = localAddress, localPort = localPort }
  end
  stream:close()
  emit(self, "drop", data)
end

-- The listen callback of a server: accepts the connection, which comes with its
-- addresses when it is TCP (the server's own address is its local end, unless it
-- listens on every interface). One closure per server, the server its upvalue.
function connection_listener(self)
  return function(err)
    if err then return emit_error(self, err) end
    local h = self._handle
    if not h then return end
    local ends = self._localEnd
    if ends == nil then ends = local_end(self) end
    ends = ends or UNKNOWN_END
    local stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort, localFamily =
      stream_accept(h, ends.address, ends.port, ends.family)
    if not stream then
      local code = remotePort -- (nil, message, code)
      if code == "EAGAIN" then return end
      return emit_error(self, uv_error(code, "accept"))
    end
    if self.maxConnections ~= nil and self:_full(stream.close, stream) then
      return drop(self, stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort)
    end
    accept_stream(self, stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort, localFamily)
  end
end

--- Takes over a bound (not yet listening) handle from the master and listens on it
-- (the cluster layer's SCHED_NONE). Internal.
-- @param stream a cluster.tcp or cluster.pipe userdata
-- @treturn boolean whether it listens (on failure, `'error'` follows)
function Server:_adoptHandle(stream)
  if self:_listenCancelled() then
    stream:close()
    return false
  end
  local ok, _, code = stream:listen(self._backlog or DEFAULT_BACKLOG, connection_listener(self))
  if not ok then
    stream:close()
    local err = uv_error(code, "listen")
    defer(function() emit_error(self, err) end)
    return false
  end
  self:_setHandle(stream)
  return true
end

--- Marks the server as listening without a handle of its own and emits `'listening'`
-- (the cluster layer's round-robin: the master accepts and sends connections). Internal.
-- @tparam table|string address what `server:address()` will return
function Server:_setListening(address)
  if self:_listenCancelled() then
    if self._onClose then self._onClose(self) end
    return
  end
  self._address = address
  self.listening = true
  defer(function() if self.listening then self:emit("listening") end end)
end

--- Wraps an accepted, connected stream as a Socket and emits `'connection'`. Internal:
-- `Server._acceptStream` (round-robin connections from the master come through it too).
-- @param stream a cluster.tcp or cluster.pipe userdata
-- @param remoteAddress, remotePort, remoteFamily, localAddress, localPort, localFamily
--   optional: the connection's addresses when the caller knows them (else read from
--   the stream)
-- @treturn Socket|nil the socket, or nil when the server is not listening (stream closed)
function accept_stream(self, stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort,
                       localFamily)
  if not self.listening then
    stream:close()
    return nil
  end
  local sock = socket_from_stream(stream, self, self, remoteAddress, remotePort, remoteFamily,
                                  localAddress, localPort, localFamily)
  self._connectionCount = self._connectionCount + 1
  local all = self._listeners -- (the listener called directly: once per connection)
  local on_connection = all and all.connection
  if on_connection then on_connection(sock) end
  -- its first bytes are read at the end of this turn (the core's read_soon: a
  -- connection answered then never reaches epoll), unless the listeners paused or
  -- destroyed it: both stop reading
  if sock._reading then read_soon(sock._handle) end
  return sock
end
Server._acceptStream = accept_stream

--- Emits `'error'(err)` (raising it when nobody listens). Internal, for the cluster layer.
function Server:_emitError(err)
  if self:_listenCancelled() then return end
  self.listening = false
  emit_error(self, err)
end

-- A shared listen has completed: false if close() came first (then 'close' is on its way).
function Server:_listenCancelled()
  local cancelled = self._cancelListen
  self._listenPending, self._cancelListen = false, false
  if cancelled then
    local relisten = self._relisten
    self._relisten = nil
    -- (deferred: the cluster layer lets go of the cancelled listen first)
    defer(function()
      self:emit("close")
      if relisten then relisten() end
    end)
    return true
  end
  return false
end

function Server:_maybeClosed()
  if self._closing and not self._closeEmitted and self._connectionCount == 0 and not self._handleClosing then
    self._closeEmitted = true
    defer(function() self:emit("close") end)
  end
end

--- Stops accepting connections. `'close'` follows once every connection of the server
-- has closed. `callback` runs on `'close'`, or with an error if the server was not listening.
-- @tparam[opt] function callback
-- @treturn Server self
function Server:close(callback)
  if callback ~= nil and type(callback) ~= "function" then
    typeerror("server:close", 1, "callback", "a function", callback)
  end
  if self._listenPending and not self.listening then
    -- a shared listen is under way: it is undone when its answer comes
    if callback then self:once("close", callback) end
    self._cancelListen = true
    self._relisten = nil -- a listen asked for after an earlier close() is off too
    return self
  end
  if not self.listening and not self._handle then
    if callback then
      defer(callback, errors.new("ERR_SERVER_NOT_RUNNING", "close", "Server is not running."))
    end
    return self
  end
  if callback then self:once("close", callback) end
  self.listening = false
  self._closing = true
  local h = self._handle
  if h then
    self._handle = nil
    self._handleClosing = true
    h:close(function()
      self._handleClosing = false
      self:_maybeClosed()
    end)
  end
  if self._onClose then self._onClose(self) end
  self:_maybeClosed()
  return self
end

--- The bound address: `{address=, family=, port=}`, or the path for a unix socket,
-- or nil when not listening.
function Server:address()
  local h = self._handle
  if h then
    if self._path then return self._path end
    return (h:getsockname())
  end
  if self.listening then return self._address end
  return nil
end

--- Calls `callback(nil, count)` with the number of open connections.
function Server:getConnections(callback)
  if type(callback) ~= "function" then typeerror("server:getConnections", 1, "callback", "a function", callback) end
  defer(callback, nil, self._connectionCount)
  return self
end

-- Server:unref() / Server:ref(): whether the open server keeps the loop alive
loop.refMethods(Server)

--- Wraps a listening stream handle (received over the IPC channel) as a Server. Internal.
function M._wrapServer(stream)
  local server = M.createServer()
  if kind_of(stream) == "pipe" then
    local path = stream:getsockname()
    server._path = path
  end
  server:_adoptHandle(stream)
  return server
end

M._uvError = uv_error

return M
