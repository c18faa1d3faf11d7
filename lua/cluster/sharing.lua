--- Port sharing through the master (Node's cluster "queryServer" protocol), and
-- handles passed with messages.
--
-- The key of a shared socket is its address, port, address type and fd, plus the
-- worker's count of listens on that key, so that the n-th listen(0) in every worker gets
-- the same port. SCHED_RR: the master listens and a C distributor (csrc/rr.c) hands
-- each connection to a worker. SCHED_NONE and UDP: the master binds and sends the bound
-- socket to each worker, which accepts (or receives) itself.
-- @module cluster.sharing
local core = require "cluster.core"
local loop = require "cluster.loop"
local errors = require "cluster.errors"

local M = {}

local pairs, type, tostring = pairs, type, tostring

local function address_type_of(host, udp_type)
  if udp_type then return udp_type end
  if host and host:find(":", 1, true) then return 6 end
  return 4
end

-- Node's errors say "bind EADDRINUSE 127.0.0.1:8000". host: the address the master
-- tried (for a listen with no host, "::" or "0.0.0.0", as net's own listen names it).
local function address_error(code, syscall, msg, host, note)
  local address = host or msg.address
  local where = msg.path or (tostring(address) .. ":" .. tostring(msg.port))
  return {
    code = code, syscall = syscall, message = syscall .. " " .. code .. " " .. where .. (note or ""),
    address = not msg.path and address or nil, port = msg.port, path = msg.path,
  }
end
local function bind_error(code, msg, host) return address_error(code, "bind", msg, host) end

-- The contract's error object (with errno, as net's own errors have) from a reply's err.
local function as_error(t)
  local fields = { address = t.address, port = t.port, path = t.path }
  local ok, e = pcall(core.error_object, t.code, t.syscall)
  if not ok then return errors.new(t.code, t.syscall, t.message, fields) end
  e.message = t.message
  for k, v in pairs(fields) do e[k] = v end
  return e
end

-- ---------------------------------------------------------------------------
-- Handles passed with user messages: the sender says what kind of object it was.

local function raw_handle(obj)
  if type(obj) ~= "table" then return nil end
  local net = package.loaded["cluster.net"]
  local dgram = package.loaded["cluster.dgram"]
  if net and getmetatable(obj) == net.Server then return obj._handle, "net.Server" end
  if net and getmetatable(obj) == net.Socket then return obj._handle, "net.Socket" end
  if dgram and getmetatable(obj) == dgram.Socket then return obj._handle, "dgram.Socket", obj.type end
  return nil
end

-- Why obj cannot be sent (raw_handle found no descriptor in it).
local function unsendable(obj)
  local net = package.loaded["cluster.net"]
  if net and getmetatable(obj) == net.Server and obj.listening then
    return "a server shared by round-robin has no socket of its own to send (listen with exclusive=true, or use SCHED_NONE)"
  end
  return "expected a listening net server, a connected net socket or a bound dgram socket"
end

--- Sends a message with a net/dgram object over a channel (both roles).
function M.sendWithHandle(channel, message, obj, callback)
  local raw, kind, udp_type = raw_handle(obj)
  if not raw then errors.argerror("worker:send", 2, "handle", unsendable(obj)) end
  -- a socket is the receiver's now: the sender stops reading it at once (what arrives
  -- from here on is the receiver's to read), and its copy closes once every send of it
  -- is written
  local done = callback
  local was_paused
  if kind == "net.Socket" then
    was_paused = obj:isPaused()
    obj:pause()
    obj._sendsInFlight = (obj._sendsInFlight or 0) + 1
    done = function(err)
      obj._sendsInFlight = obj._sendsInFlight - 1
      if obj._sendsInFlight == 0 and not obj.destroyed then obj:destroy() end
      if callback then callback(err) end
    end
  end
  local ok, res = pcall(channel.send, channel, true,
    { act = "handle", kind = kind, udpType = udp_type, msg = message }, raw, done)
  if kind == "net.Socket" and not (ok and res ~= nil) then -- (false: sent, the backlog is long)
    -- nothing was sent: the socket stays the sender's, as it was
    obj._sendsInFlight = obj._sendsInFlight - 1
    if obj._sendsInFlight == 0 and not was_paused and not obj.destroyed then obj:resume() end
  end
  if not ok then errors.raise(res) end
  return res
end

local HANDLE_TYPES = {   -- kind -> the raw handle types it can be made of
  ["net.Server"] = { ["cluster.tcp"] = true, ["cluster.pipe"] = true },
  ["net.Socket"] = { ["cluster.tcp"] = true, ["cluster.pipe"] = true },
  ["dgram.Socket"] = { ["cluster.udp"] = true },
}

--- Turns a received raw handle into the object the sender had, or nil (the handle
-- closed) when the message's kind does not fit the descriptor that came with it: what
-- a peer sends must not be able to raise here.
-- The internal messages (by act) that take the descriptor they bring.
local ACTS_WITH_HANDLE = { handle = true, queryReply = true }

--- The descriptor a received message brought, when a message of its act (internal;
-- nil for a user message, whose objects come as internal "handle" messages) takes one;
-- any other is closed as it arrives. false stays false for an act that takes one: the
-- message announced a descriptor the kernel dropped, for want of room (EMFILE).
-- Internal, for both roles' channel readers.
function M.keptHandle(handle, act)
  if ACTS_WITH_HANDLE[act] then return handle end
  if handle then handle:close() end
  return nil
end

-- The error of a listen or bind (syscall) whose socket the master sent but the kernel
-- dropped: a worker with no file descriptor left has no room for it.
local function socket_lost(syscall, msg)
  return as_error(address_error("EMFILE", syscall, msg, nil,
    " (the master's socket did not arrive: no file descriptors left)"))
end

-- The receiver's 'error' for an object sent with a message (worker:send(msg, obj)) that
-- the kernel dropped; the message comes without it.
local function object_lost()
  return as_error({ code = "EMFILE", syscall = "recvmsg",
    message = "recvmsg EMFILE: the object sent with a message did not arrive (no file descriptors left)" })
end

function M.wrapHandle(kind, raw, udp_type)
  local mt = getmetatable(raw)
  local fits = type(kind) == "string" and HANDLE_TYPES[kind]
  if not (fits and type(mt) == "table" and fits[mt.__name])
     or (udp_type ~= nil and udp_type ~= "udp4" and udp_type ~= "udp6") then
    raw:close()
    return nil
  end
  if kind == "net.Server" then
    local net = require "cluster.net"
    local server = net.createServer()
    -- a descriptor that cannot listen (a connected socket sent as a server) fails
    -- without an 'error' that nobody could have listened for yet
    local swallow = function() end
    server:on("error", swallow)
    if not server:_adoptHandle(raw) then return nil end
    server:off("error", swallow)
    return server
  elseif kind == "net.Socket" then
    return require("cluster.net")._wrapStream(raw)
  end
  return require("cluster.dgram")._wrapUdp(raw, udp_type)
end

-- ---------------------------------------------------------------------------
-- Master

function M.installMaster(cluster)
  local internal = cluster._internal
  local entries = {}        -- key -> {key=, rr=|handle=, workers={[id]=worker}, path=, cwd=}

  local function count_entries()
    local n = 0
    for _ in pairs(entries) do n = n + 1 end
    return n
  end
  cluster._sharedHandleCount = count_entries

  -- Runs fn in directory cwd (nil: where we are) and comes back; fn's results, or the
  -- error triple when cwd is unreachable or ours is gone (there would be no way back).
  local function with_cwd(cwd, fn)
    if not cwd then return fn() end
    local here, msg, code = core.cwd()
    if not here then return nil, msg, code end
    local ok
    ok, msg, code = core.chdir(cwd)
    if not ok then return nil, msg, code end
    local a, b, c = fn()
    core.chdir(here)
    return a, b, c
  end

  -- The name to bind a worker's unix path by, and the directory to bind (and close) it
  -- in. A relative path is the worker's, not the master's: it is made absolute when that
  -- fits in sun_path, else bound from the worker's cwd (Node's relative-path test).
  local SUN_PATH_MAX = 107
  local function bind_name(msg)
    local path = msg.path
    if path:sub(1, 1) == "/" or not msg.cwd then return path, nil end
    local absolute = msg.cwd .. "/" .. path
    if #absolute <= SUN_PATH_MAX then return absolute, nil end
    return path, msg.cwd
  end

  local function close_entry(entry)
    entries[entry.key] = nil
    local h = entry.rr or entry.handle
    local closed = false
    local function close()
      closed = true
      h:close(function() cluster._checkAllDisconnected() end)
    end
    -- libuv unlinks a bound unix path while closing, by the name it was bound by: close
    -- in the directory it was bound in. If that is gone, close from a directory where
    -- no unlink can succeed rather than from ours, where a same-named file may live.
    if entry.cwd then
      with_cwd(entry.cwd, close)
      if not closed then with_cwd("/proc", close) end
    end
    if not closed then close() end
  end

  -- The worker leaves the key. how: "disconnecting" (worker:disconnect(): out of the
  -- distribution at once, its servers still closing), "closed" (it closed its copy),
  -- "gone" (its channel ended, so unanswered connections go to other workers at once)
  -- or "exited" (its process is reaped).
  -- A worker may still hold its copy of a socket the master sent it (SCHED_NONE, UDP)
  -- while it is disconnecting (until its server has closed) and after its channel ended
  -- (a dying process closes its descriptors one by one; the channel's may go first): the
  -- master keeps the socket as long, so that a worker's listen meanwhile gets it too
  -- instead of binding the address afresh, which the old copy still holds (EADDRINUSE).
  -- entry.leaving: such workers, by id.
  local function leave(entry, worker, how)
    local id = worker.id
    local holds = entry.handle ~= nil and (how == "disconnecting" or (how == "gone" and not worker._exited))
    if entry.workers[id] then
      entry.workers[id] = nil
      if entry.rr and worker._channel then
        entry.handed = (entry.handed or 0) + entry.rr:handed(worker._channel)
        worker._handedBefore = (worker._handedBefore or 0) + entry.rr:handed(worker._channel)
        entry.rr:remove(worker._channel, how == "gone")
      elseif holds then
        entry.leaving = entry.leaving or {}
        entry.leaving[id] = true
      end
    elseif entry.leaving and entry.leaving[id] then
      if holds then return end
      entry.leaving[id] = nil
    else
      -- a worker that left (disconnect) and now died: what it still held unanswered goes
      -- to another worker (rr:remove ignores a channel that is not a member)
      if how == "gone" and entry.rr and worker._channel then entry.rr:remove(worker._channel, true) end
      return
    end
    if next(entry.workers) == nil and next(entry.leaving or {}) == nil then close_entry(entry) end
  end

  local function leave_all(worker, how)
    for _, entry in pairs(entries) do leave(entry, worker, how) end
  end
  cluster._onWorkerDisconnecting = function(worker) leave_all(worker, "disconnecting") end
  cluster._onWorkerDisconnected = function(worker) leave_all(worker, "gone") end
  cluster._onWorkerExited = function(worker) leave_all(worker, "exited") end

  --- Connections handed to this worker through round-robin so far.
  function cluster._handedTo(worker)
    local n = worker._handedBefore or 0
    if worker._channel and worker._connected then
      for _, entry in pairs(entries) do
        if entry.rr and entry.workers[worker.id] then n = n + entry.rr:handed(worker._channel) end
      end
    end
    return n
  end

  local function create(msg)
    local policy = cluster._policy()
    local udp = msg.addressType == "udp4" or msg.addressType == "udp6"
    local entry = { key = msg.key, workers = {} }
    local hosts = msg.address and { msg.address } or { "::", "0.0.0.0" }
    local name, cwd
    if msg.path then
      name, cwd = bind_name(msg)
      entry.path, entry.cwd = msg.path, cwd
    end
    local last_code, last_host
    for _, host in ipairs(hosts) do
      local ok, _, code
      if udp then
        local h
        h, _, code = core.udp_new(msg.addressType)
        if h then
          ok, _, code = h:bind(host, msg.port, { reuseAddr = msg.reuseAddr, ipv6Only = msg.ipv6Only })
          if ok then entry.handle = h else h:close() end
        end
      elseif policy == cluster.SCHED_RR then
        local r
        if msg.path then
          r, _, code = with_cwd(cwd, function() return core.rr_listen("pipe", name, 0, msg.backlog) end)
        else
          r, _, code = core.rr_listen("tcp", host, msg.port, msg.backlog, msg.ipv6Only)
        end
        ok = r ~= nil
        entry.rr = r
      elseif msg.path then
        ok, _, code = with_cwd(cwd, function()
          local h = core.pipe_new()
          local bound, m, c = h:bind(name)
          if bound then bound, m, c = core.listen_fd(h, msg.backlog) end
          if bound then entry.handle = h else h:close() end -- in cwd: see close_entry
          return bound, m, c
        end)
      else
        local h = core.tcp_new()
        ok, _, code = h:bind(host, msg.port, { ipv6Only = msg.ipv6Only })
        -- libuv delays a bind's EADDRINUSE to uv_listen, which listen_fd does not call
        -- (a plain listen(2) would then bind the socket to a random port on every
        -- interface); getsockname reports the delayed error
        if ok then ok, _, code = h:getsockname() end
        if ok then ok, _, code = core.listen_fd(h, msg.backlog) end
        if ok then entry.handle = h else h:close() end
      end
      if ok then
        entry.host = host
        return entry
      end
      last_code, last_host = code, host
      if code == "EADDRINUSE" or code == "EACCES" then break end
    end
    return nil, last_code, not msg.path and last_host or nil
  end

  local function sockname(entry)
    local h = entry.rr or entry.handle
    if entry.rr then return h:address() end
    if entry.path or h.getsockname == nil then return nil end
    return (h:getsockname())
  end

  local ADDRESS_TYPES = { [4] = true, [6] = true, [-1] = true, udp4 = true, udp6 = true }
  local function optional(v, t) return v == nil or type(v) == t end
  local function integer_in(v, lo, hi) return math.type(v) == "integer" and v >= lo and v <= hi end

  -- A queryServer as this module's workers send it; anything else is refused, so a
  -- worker cannot make the master raise or listen on something it did not mean.
  local function well_formed(msg)
    if type(msg.key) ~= "string" or not ADDRESS_TYPES[msg.addressType] then return false end
    if not (optional(msg.address, "string") and optional(msg.path, "string") and optional(msg.cwd, "string")) then
      return false
    end
    if msg.backlog ~= nil and not integer_in(msg.backlog, 0, 0x7fffffff) then return false end
    if msg.addressType == -1 then return msg.path ~= nil end
    return msg.path == nil and integer_in(msg.port, 0, 65535)
  end

  function internal.queryServer(worker, msg)
    -- Node: a worker being disconnected gets no new servers (and no answer)
    if worker._disconnecting or not worker._connected then return end
    if not well_formed(msg) then
      cluster._sendInternal(worker, { act = "queryReply", seq = msg.seq, err = {
        code = "EINVAL", syscall = "bind", message = "bind EINVAL (malformed listen request)" } })
      return
    end
    local entry = entries[msg.key]
    if not entry then
      local err, host
      entry, err, host = create(msg)
      if not entry then
        -- the key is forgotten, so a later retry can succeed
        cluster._sendInternal(worker, { act = "queryReply", seq = msg.seq, err = bind_error(err or "EINVAL", msg, host) })
        return
      end
      entries[msg.key] = entry
    end
    entry.workers[worker.id] = worker
    local reply = { act = "queryReply", seq = msg.seq, sockname = sockname(entry) }
    if entry.rr then
      entry.rr:add(worker._channel)
      reply.rr = entry.rr:id()
      cluster._sendInternal(worker, reply)
    else
      cluster._sendInternal(worker, reply, entry.handle)
    end
  end

  function internal.close(worker, msg)
    local entry = entries[msg.key]
    if entry then leave(entry, worker, "closed") end
  end

  -- An object a worker sent. Nobody listening: nobody could take it, so it is closed.
  -- Its errors nobody listens for are the worker's: the object is closed and the error
  -- reported on that worker, instead of ending the master.
  function internal.handle(worker, msg, raw)
    if raw == false then cluster._reportError(worker, object_lost()) end
    if worker:listenerCount("message") + cluster:listenerCount("message") == 0 then
      if raw then raw:close() end
      return
    end
    local obj = raw and M.wrapHandle(msg.kind, raw, msg.udpType) or nil
    if obj then
      obj._onUnheardError = function(o, err)
        if o.destroy then o:destroy() else pcall(o.close, o) end
        cluster._reportError(worker, err)
      end
    end
    worker:emit("message", msg.msg, obj)
    cluster:emit("message", worker, msg.msg, obj)
  end

  cluster._sendWithHandle = function(worker, message, handle, callback)
    return M.sendWithHandle(worker._channel, message, handle, callback)
  end
end

-- ---------------------------------------------------------------------------
-- Worker

function M.installWorker(cluster)
  local internal = cluster._internal
  local pending = {}      -- seq -> function(reply, handle)
  local next_seq = 0
  local listen_counts = {} -- key without index -> {[index] = true} of open listens
  local rr_servers = {}   -- rr id -> server
  local shared = {}       -- server or socket -> key, the open shared objects

  local function query(msg, on_reply)
    next_seq = next_seq + 1
    msg.act, msg.seq = "queryServer", next_seq
    pending[next_seq] = on_reply
    cluster._hold() -- the worker waits for the answer
    cluster._sendInternal(nil, msg)
  end

  function internal.queryReply(msg, handle)
    local fn = pending[msg.seq]
    if not fn then
      -- not an answer to a query of ours: nothing waits for it
      if handle then handle:close() end
      return
    end
    pending[msg.seq] = nil
    cluster._release()
    fn(msg, handle)
  end

  function internal.handle(msg, raw)
    if raw == false then cluster._reportError(cluster.worker, object_lost()) end
    if cluster.worker:listenerCount("message") == 0 then -- (nobody could take it)
      if raw then raw:close() end
      return
    end
    local obj = raw and M.wrapHandle(msg.kind, raw, msg.udpType) or nil
    cluster.worker:emit("message", msg.msg, obj)
  end

  -- The key of the n-th open listen on an address: n is the lowest index not in use by
  -- this worker's open (or pending) listens on it, so a server that closes and listens
  -- again meets the other workers' same listen (Node's removeIndexesKey). Returns the
  -- key and a function that gives the index back.
  local function take_key(address, port, address_type)
    local base = table.concat({ tostring(address), tostring(port), tostring(address_type), "-1" }, ":")
    local used = listen_counts[base] or {}
    listen_counts[base] = used
    local index = 1
    while used[index] do index = index + 1 end
    used[index] = true
    local released = false
    return base .. ":" .. index, function()
      if released then return end
      released = true
      used[index] = nil
      if next(used) == nil and listen_counts[base] == used then listen_counts[base] = nil end
    end
  end

  local function report_listening(address_type, sockname, path)
    local info = { act = "listening", addressType = address_type }
    if path then
      info.address = path
    elseif type(sockname) == "table" then
      info.address, info.port = sockname.address, sockname.port
    end
    cluster._sendInternal(nil, info)
  end

  -- connections handed by the master's round-robin distributor (a TCP connection comes
  -- with its remote and local address, port and family, read by the master's accept)
  -- (called once per connection: plain functions and fixed arguments, no varargs)
  local accept_stream = require("cluster.net").Server._acceptStream
  local answer = cluster._channel.answer
  -- a connection the worker does not take: the master hands it to another worker
  local function refuse(channel, rr_id, seq, stream)
    answer(channel, rr_id, seq, false)
    stream:close()
  end
  cluster._channel:on_connection(function(rr_id, seq, stream, remoteAddress, remotePort, remoteFamily,
                                          localAddress, localPort, localFamily)
    local server = rr_servers[rr_id]
    local channel = cluster._channel
    -- a server at its maxConnections refuses too: the master tries the other workers
    -- (a maxConnections that is not a number refuses the connection, then raises)
    if server and server.listening and channel
        and not (server.maxConnections ~= nil and server:_full(refuse, channel, rr_id, seq, stream)) then
      answer(channel, rr_id, seq, true)
      accept_stream(server, stream, remoteAddress, remotePort, remoteFamily, localAddress, localPort, localFamily)
    elseif channel then
      refuse(channel, rr_id, seq, stream)
    else
      stream:close()
    end
  end)

  -- A round-robin server has no socket of its own: while it is referenced (not
  -- unref()'d) it holds the channel instead, which keeps the worker alive as a socket
  -- would. held: server -> true while it holds.
  local held = {}
  local function hold_for(server, referenced)
    if referenced and not held[server] then
      held[server] = true
      cluster._hold()
    elseif not referenced and held[server] then
      held[server] = nil
      cluster._release()
    end
  end

  -- An absolute path cleaned up as Node's path.resolve does, without asking the file
  -- system: no empty or "." segments, and ".." takes away the segment before it.
  local function normalize(path)
    local segments = {}
    for segment in path:gmatch("[^/]+") do
      if segment == ".." then
        segments[#segments] = nil
      elseif segment ~= "." then
        segments[#segments + 1] = segment
      end
    end
    return "/" .. table.concat(segments, "/")
  end

  -- A listen's path as the master names it (absolute and normalized, so that
  -- "s.sock" and "./s.sock" are one socket), and the directory the path is relative
  -- to (nil for an absolute path); nil when this worker's cwd is gone.
  local function locate(path)
    if path:sub(1, 1) == "/" then return normalize(path), nil end
    local cwd = core.cwd()
    if not cwd then return nil end
    return normalize(cwd .. "/" .. path), cwd
  end

  function cluster._shareListen(server, opts)
    local address_type = opts.path and -1 or address_type_of(opts.host)
    -- "localhost" is 127.0.0.1, as net's listen outside a worker takes it: one address
    -- to share whichever way a worker spells it
    local host = opts.host == "localhost" and "127.0.0.1" or opts.host
    local cwd, where = nil, host
    if opts.path then
      -- a relative path names a socket in this worker's cwd: two workers in different
      -- directories listening on "s.sock" are two sockets
      where, cwd = locate(opts.path)
      if not where then
        loop.defer(function()
          server:_emitError(as_error(bind_error("ENOENT", { path = opts.path })))
        end)
        return
      end
    end
    local key, release_key = take_key(where, opts.port, address_type)
    query({
      key = key, address = host, port = opts.port, addressType = address_type,
      path = opts.path, cwd = cwd, backlog = opts.backlog,
      ipv6Only = opts.ipv6Only,
    }, function(reply, handle)
      if reply.err then
        release_key()
        server:_emitError(as_error(reply.err))
        return
      end
      if handle == false then
        -- the master holds this worker on the key: let go, as a close would
        release_key()
        cluster._sendInternal(nil, { act = "close", key = key })
        server:_emitError(socket_lost("listen", { address = host, port = opts.port, path = opts.path }))
        return
      end
      shared[server] = key
      -- (replaces the hook of an earlier listen of this server, which has closed)
      server._onClose = function(s)
        if shared[s] ~= key then return end
        shared[s] = nil
        release_key()
        if reply.rr then
          rr_servers[reply.rr] = nil
          hold_for(s, false)
        end
        cluster._sendInternal(nil, { act = "close", key = key })
      end
      if reply.rr then
        rr_servers[reply.rr] = server
        hold_for(server, not server._unref)
        -- for server:ref() / server:unref() from now on (loop.refMethods calls _onRef)
        server._onRef = function(s) if shared[s] == key then hold_for(s, not s._unref) end end
        server:_setListening(opts.path or reply.sockname)
        -- closed before this answer came: it has let go already, nothing is listening
        if shared[server] ~= key then return end
      elseif not server:_adoptHandle(handle) then
        shared[server] = nil
        release_key()
        cluster._sendInternal(nil, { act = "close", key = key })
        return
      end
      -- the master's 'listening' has the bound family, and a unix path made absolute
      local sockname = reply.sockname
      if type(sockname) == "table" then address_type = sockname.family == "IPv6" and 6 or 4 end
      report_listening(address_type, sockname, opts.path and where)
    end)
  end

  function cluster._shareBind(socket, opts)
    local address_type = opts.type
    local key, release_key = take_key(opts.address, opts.port, address_type)
    query({
      key = key, address = opts.address, port = opts.port, addressType = address_type,
      reuseAddr = opts.reuseAddr, ipv6Only = opts.ipv6Only,
    }, function(reply, handle)
      if reply.err then
        release_key()
        socket:_failBind(as_error(reply.err))
        return
      end
      if handle == false then
        release_key()
        cluster._sendInternal(nil, { act = "close", key = key })
        socket:_failBind(socket_lost("bind", opts))
        return
      end
      shared[socket] = key
      socket._onClose = function(s)
        if shared[s] then
          shared[s] = nil
          release_key()
          cluster._sendInternal(nil, { act = "close", key = key })
        end
      end
      socket:_adoptHandle(handle)
      -- closed before this answer came: it has let go already, nothing is bound
      if shared[socket] ~= key then return end
      report_listening(address_type, reply.sockname)
    end)
  end

  --- Closes every shared server and socket; done() once all have closed.
  function cluster._closeSharedServers(done)
    local waiting = 1
    local function one_closed()
      waiting = waiting - 1
      if waiting == 0 then done() end
    end
    for obj in pairs(shared) do
      waiting = waiting + 1
      obj:close(one_closed)
    end
    one_closed()
  end

  cluster._sendWithHandle = function(_, message, handle, callback)
    return M.sendWithHandle(cluster._channel, message, handle, callback)
  end
end

return M
