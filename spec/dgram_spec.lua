-- cluster.dgram in a plain process: real UDP sockets on loopback.
local core = require "cluster.core"
local dgram = require "cluster.dgram"

local function run_until(cond, ms)
  local timed_out = false
  local guard = core.timer()
  guard:start(ms or 5000, 0, function() timed_out = true end)
  local ok, err = pcall(function()
    while not cond() and not timed_out do core.run_once() end
  end)
  guard:close()
  if not ok then error(err, 0) end
  return cond() and true or false
end

local function settle()
  local deadline = core.hrtime() + 2
  while core.alive() and core.hrtime() < deadline do core.poll() end
  return not core.alive()
end

local function has_ipv6()
  local h = core.udp_new()
  local ok = h:bind("::1", 0)
  h:close()
  settle()
  return ok == true
end

local function close_all(...)
  local sockets = { ... }
  local closed = 0
  for _, s in ipairs(sockets) do s:close(function() closed = closed + 1 end) end
  assert.is_true(run_until(function() return closed == #sockets end), "'close' never came")
end

-- A bound udp4 echo socket on 127.0.0.1; returns it and its port.
local function echo_socket()
  local s = dgram.createSocket("udp4")
  s:on("message", function(msg, rinfo) s:send(msg, rinfo.port, rinfo.address) end)
  local ready = false
  s:bind(0, "127.0.0.1", function() ready = true end)
  assert.is_true(run_until(function() return ready end))
  return s, s:address().port
end

describe("cluster.dgram", function()
  local idle_before
  before_each(function() idle_before = settle() end)
  after_each(function()
    if idle_before then assert.is_true(settle(), "a handle was left open") end
  end)

  it("echoes a datagram and reports rinfo {address, family, port, size}", function()
    local server, port = echo_socket()
    local seen
    server:on("message", function(msg, rinfo) seen = { msg = msg, rinfo = rinfo } end)
    local client = dgram.createSocket("udp4")
    local reply, reply_info
    client:on("message", function(msg, rinfo) reply, reply_info = msg, rinfo end)
    client:bind(0, "127.0.0.1")
    client:send("ping", port, "127.0.0.1")
    assert.is_true(run_until(function() return reply ~= nil end))
    assert.are.equal("ping", reply)
    assert.are.same({ address = "127.0.0.1", family = "IPv4", port = port, size = 4 }, reply_info)
    assert.are.equal("ping", seen.msg)
    assert.are.same({ address = "127.0.0.1", family = "IPv4", port = client:address().port, size = 4 },
      seen.rinfo)
    close_all(server, client)
  end)

  it("emits 'listening' after bind returns and address() reports the port", function()
    local s = dgram.createSocket({ type = "udp4" })
    local events = {}
    s:on("listening", function() events[#events + 1] = "listening" end)
    s:bind(0, "127.0.0.1")
    events[#events + 1] = "returned"
    assert.is_true(run_until(function() return #events == 2 end))
    assert.are.same({ "returned", "listening" }, events)
    local a = s:address()
    assert.are.equal("127.0.0.1", a.address)
    assert.are.equal("IPv4", a.family)
    assert.is_true(a.port > 0)
    close_all(s)
  end)

  it("binds to every interface by default", function()
    local s = dgram.createSocket("udp4")
    s:bind()
    assert.are.equal("0.0.0.0", s:address().address)
    close_all(s)
  end)

  it("takes bind options {port=, address=}", function()
    local s = dgram.createSocket("udp4")
    local ready = false
    s:bind({ port = 0, address = "127.0.0.1" }, function() ready = true end)
    assert.is_true(run_until(function() return ready end))
    assert.are.equal("127.0.0.1", s:address().address)
    close_all(s)
  end)

  it("reports EADDRINUSE on a second bind without reuseAddr", function()
    local a = dgram.createSocket("udp4")
    a:bind(0, "127.0.0.1")
    local port = a:address().port
    local b = dgram.createSocket("udp4")
    local err
    b:on("error", function(e) err = e end)
    b:bind(port, "127.0.0.1")
    assert.is_true(run_until(function() return err ~= nil end))
    assert.are.equal("EADDRINUSE", err.code)
    assert.are.equal("bind", err.syscall)
    assert.is_true(err.errno < 0)
    assert.are.equal("bind EADDRINUSE 127.0.0.1:" .. port, err.message)
    assert.are.equal(err.message, tostring(err))
    assert.are.equal("127.0.0.1", err.address)
    assert.are.equal(port, err.port)
    close_all(a, b)
  end)

  it("lets two sockets share a port with reuseAddr", function()
    local a = dgram.createSocket({ type = "udp4", reuseAddr = true })
    a:bind(0, "127.0.0.1")
    local port = a:address().port
    local b = dgram.createSocket({ type = "udp4", reuseAddr = true })
    local err, ready = nil, false
    b:on("error", function(e) err = e end)
    b:bind(port, "127.0.0.1", function() ready = true end)
    assert.is_true(run_until(function() return ready or err ~= nil end))
    assert.is_nil(err)
    assert.are.equal(port, b:address().port)
    close_all(a, b)
  end)

  it("binds implicitly on the first send and runs the send callback", function()
    local server, port = echo_socket()
    local client = dgram.createSocket("udp4")
    local sent, reply = false, nil
    client:on("message", function(msg) reply = msg end)
    client:send("implicit", port, "127.0.0.1", function(err)
      assert.is_nil(err)
      sent = true
    end)
    assert.is_true(client:address().port > 0)
    assert.is_true(run_until(function() return sent and reply ~= nil end))
    assert.are.equal("implicit", reply)
    close_all(server, client)
  end)

  it("sends a list of strings as one datagram and defaults to localhost", function()
    local server, port = echo_socket()
    local got
    server:on("message", function(msg) got = msg end)
    local client = dgram.createSocket("udp4")
    client:send({ "a", "b", "c" }, port)
    assert.is_true(run_until(function() return got ~= nil end))
    assert.are.equal("abc", got)
    close_all(server, client)
  end)

  it("carries an empty datagram and binary data", function()
    local server, port = echo_socket()
    local got = {}
    server:on("message", function(msg) got[#got + 1] = msg end)
    local client = dgram.createSocket("udp4")
    client:send("", port, "127.0.0.1")
    client:send("\0\1\2\255", port, "127.0.0.1")
    assert.is_true(run_until(function() return #got == 2 end))
    assert.are.same({ "", "\0\1\2\255" }, got)
    close_all(server, client)
  end)

  it("takes an empty address as none, as Node does: bind on every interface, send to localhost", function()
    local server = dgram.createSocket("udp4")
    local got
    server:on("message", function(msg, rinfo) got = { msg, rinfo.address } end)
    local bound = false
    server:bind(0, "", function() bound = true end)
    assert.is_true(run_until(function() return bound end))
    assert.are.equal("0.0.0.0", server:address().address)
    local client = dgram.createSocket("udp4")
    client:send("hi", server:address().port, "")
    assert.is_true(run_until(function() return got ~= nil end))
    assert.are.same({ "hi", "127.0.0.1" }, got)
    close_all(server, client)
  end)

  it("passes a send failure to the callback", function()
    local s = dgram.createSocket("udp4")
    s:bind(0, "127.0.0.1")
    local err
    s:send("x", 9, "::1", function(e) err = e end) -- an IPv6 destination from an IPv4 socket
    assert.is_true(run_until(function() return err ~= nil end))
    assert.are.equal("send", err.syscall)
    assert.is_string(err.code)
    close_all(s)
  end)

  it("calls send's callback with (nil, bytes) on success, as Node does", function()
    local server, port = echo_socket()
    local client = dgram.createSocket("udp4")
    local args = {}
    client:send("hello", port, "127.0.0.1", function(...) args[#args + 1] = table.pack(...) end)
    client:send({ "ab", "cd" }, port, function(...) args[#args + 1] = table.pack(...) end)
    client:send("", port, function(...) args[#args + 1] = table.pack(...) end)
    assert.is_true(run_until(function() return #args == 3 end))
    assert.are.same({ { n = 2, nil, 5 }, { n = 2, nil, 4 }, { n = 2, nil, 0 } }, args)
    close_all(server, client)
  end)

  it("calls back the sends a close cancelled with ECANCELED, not success: as many datagrams arrive as callbacks said were sent, and 'close' comes after them all", function()
    local server, port = echo_socket()
    local received = 0
    server:on("message", function() received = received + 1 end)
    local client = dgram.createSocket("udp4")
    client:bind(0, "127.0.0.1")
    local sent, cancelled, other, closed_after = 0, 0, {}, nil
    for _ = 1, 20 do
      client:send("x", port, "127.0.0.1", function(err, bytes)
        if err == nil and bytes == 1 then
          sent = sent + 1
        elseif err and err.code == "ECANCELED" and err.syscall == "send" and bytes == nil then
          cancelled = cancelled + 1
        else
          other[#other + 1] = tostring(err) .. " " .. tostring(bytes)
        end
      end)
    end
    client:close(function() closed_after = sent + cancelled + #other end)
    assert.is_true(run_until(function() return closed_after ~= nil end))
    assert.are.same({}, other)
    assert.are.equal(20, closed_after)
    run_until(function() return received > sent end, 200)
    assert.are.equal(sent, received)
    close_all(server)
  end)

  it("drops the callback of a failed bind: a later bind that succeeds runs only its own, as in Node", function()
    local holder, port = echo_socket()
    local s = dgram.createSocket("udp4")
    local events = {}
    s:on("error", function(e) events[#events + 1] = "error " .. e.code end)
    s:bind(port, "127.0.0.1", function() events[#events + 1] = "first callback" end)
    assert.is_true(run_until(function() return #events == 1 end))
    s:bind(0, "127.0.0.1", function() events[#events + 1] = "second callback" end)
    assert.is_true(run_until(function() return #events == 2 end))
    run_until(function() return #events > 2 end, 50)
    assert.are.same({ "error EADDRINUSE", "second callback" }, events)
    close_all(holder, s)
  end)

  it("stays binding until a failed bind is reported: a send made meanwhile gets the bind error and binds nowhere else; a second bind raises", function()
    local holder, port = echo_socket()
    local s = dgram.createSocket("udp4")
    local events = {}
    s:on("error", function(e) events[#events + 1] = "error " .. e.code end)
    s:on("listening", function() events[#events + 1] = "listening" end)
    s:bind(port, "127.0.0.1")
    s:send("x", port, "127.0.0.1", function(err, bytes)
      events[#events + 1] = "send " .. tostring(err and err.code) .. " " .. tostring(bytes)
    end)
    assert.has_error(function() s:bind(0) end, "socket:bind: the socket is already bound")
    assert.is_true(run_until(function() return #events == 2 end))
    run_until(function() return #events > 2 end, 50)
    assert.are.same({ "send EADDRINUSE nil", "error EADDRINUSE" }, events)
    assert.has_error(function() s:address() end, "socket:address: the socket is not bound")
    close_all(holder, s)
  end)

  it("close() emits 'close'; closing again and address() when unbound raise", function()
    local s = dgram.createSocket("udp4")
    assert.has_error(function() s:address() end, "socket:address: the socket is not bound")
    local closed = false
    s:close(function() closed = true end)
    assert.is_true(run_until(function() return closed end))
    assert.has_error(function() s:close() end, "socket:close: the socket is not running")
    assert.has_error(function() s:send("x", 1) end, "socket:send: the socket is closed")
  end)

  it("raises on bad arguments, naming the function and argument", function()
    assert.has_error(function() dgram.createSocket("udp5") end,
      'dgram.createSocket: bad argument #1 (type): expected "udp4" or "udp6", got udp5')
    assert.has_error(function() dgram.createSocket(42) end)
    local s = dgram.createSocket("udp4")
    assert.has_error(function() s:send(42, 1) end,
      "socket:send: bad argument #1 (msg): expected a string or a list of strings, got number")
    assert.has_error(function() s:send("x", 0) end,
      "socket:send: bad argument #2 (port): expected a port number in 1..65535, got number")
    assert.has_error(function() s:bind(70000) end)
    assert.has_error(function() s:bind(0, 42) end,
      "socket:bind: bad argument #2 (address): expected a string, got number")
    close_all(s)
  end)

  it("raises when bound twice", function()
    local s = dgram.createSocket("udp4")
    s:bind(0, "127.0.0.1")
    assert.has_error(function() s:bind(0) end, "socket:bind: the socket is already bound")
    close_all(s)
  end)

  it("sets socket options on a bound socket", function()
    local s = dgram.createSocket("udp4")
    s:bind(0, "127.0.0.1")
    s:setBroadcast(true)
    s:setTTL(32)
    s:setMulticastTTL(2)
    s:setMulticastLoopback(true)
    close_all(s)
  end)

  it("option setters raise on bad arguments, naming the function and argument", function()
    local s = dgram.createSocket("udp4")
    s:bind(0, "127.0.0.1")
    assert.has_error(function() s:setTTL("x") end,
      "socket:setTTL: bad argument #1 (ttl): expected an integer, got string")
    assert.has_error(function() s:setMulticastTTL(1.5) end,
      "socket:setMulticastTTL: bad argument #1 (ttl): expected an integer, got number")
    assert.has_error(function() s:addMembership() end,
      "socket:addMembership: bad argument #1 (group): expected a string, got nil")
    assert.has_error(function() s:dropMembership("239.1.2.3", 5) end,
      "socket:dropMembership: bad argument #2 (interface): expected a string, got number")
    local ok, err = pcall(s.setTTL, s, 0) -- out of range: the kernel's EINVAL, as in Node
    assert.is_false(ok)
    assert.are.equal("EINVAL", err.code)
    assert.are.equal("setTTL", err.syscall)
    s:setTTL(64.0)
    close_all(s)
  end)

  it("echoes over udp6 on ::1 when the system has IPv6", function()
    if not has_ipv6() then
      pending("no IPv6 on this system")
      return
    end
    local server = dgram.createSocket("udp6")
    server:on("message", function(msg, rinfo) server:send(msg, rinfo.port, rinfo.address) end)
    server:bind(0, "::1")
    local port = server:address().port
    assert.are.equal("IPv6", server:address().family)
    local client = dgram.createSocket("udp6")
    local reply, info
    client:on("message", function(msg, rinfo) reply, info = msg, rinfo end)
    client:send("six", port, "localhost")
    assert.is_true(run_until(function() return reply ~= nil end))
    assert.are.equal("six", reply)
    assert.are.same({ address = "::1", family = "IPv6", port = port, size = 3 }, info)
    close_all(server, client)
  end)

  it("in a worker, bind hands options to cluster._shareBind unless exclusive", function()
    local saved = package.loaded["cluster"]
    local calls = {}
    package.loaded["cluster"] = {
      isWorker = true,
      _shareBind = function(socket, opts) calls[#calls + 1] = { socket = socket, opts = opts } end,
    }
    local ok, err = pcall(function()
      local s = dgram.createSocket({ type = "udp4", reuseAddr = true })
      s:bind(41234)
      assert.are.same({ port = 41234, address = "0.0.0.0", type = "udp4", reuseAddr = true,
                        ipv6Only = false, exclusive = false }, calls[1].opts)
      -- the answer: a handle bound by the master
      local h = core.udp_new("udp4")
      h:bind("127.0.0.1", 0)
      local listened = false
      s:on("listening", function() listened = true end)
      s:_adoptHandle(h)
      assert.is_true(run_until(function() return listened end))
      local ex = dgram.createSocket("udp4")
      ex:bind({ port = 0, address = "127.0.0.1", exclusive = true })
      assert.are.equal(1, #calls)
      close_all(s, ex)
    end)
    package.loaded["cluster"] = saved
    if not ok then error(err, 0) end
  end)

  it("_wrapUdp turns a bound handle into a receiving socket", function()
    local h = core.udp_new("udp4")
    h:bind("127.0.0.1", 0)
    local s = dgram._wrapUdp(h)
    assert.are.equal("udp4", s.type)
    local got
    s:on("message", function(msg) got = msg end)
    local client = dgram.createSocket("udp4")
    client:send("wrapped", s:address().port, "127.0.0.1")
    assert.is_true(run_until(function() return got ~= nil end))
    assert.are.equal("wrapped", got)
    close_all(s, client)
  end)
end)
