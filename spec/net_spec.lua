-- cluster.net in a plain process: real sockets on loopback and unix paths.
local core = require "cluster.core"
local net = require "cluster.net"

-- Runs the loop until cond() holds or `ms` pass; returns cond(). Re-raises an error
-- raised in a callback (after closing its guard timer).
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

-- Runs the loop for `ms` (for "nothing happens" checks).
local function run_for(ms)
  local done = false
  local t = core.timer()
  t:start(ms, 0, function() done = true end)
  while not done do core.run_once() end
  t:close()
end

-- Lets closing handles finish; true when the loop has nothing left.
local function settle()
  local deadline = core.hrtime() + 2
  while core.alive() and core.hrtime() < deadline do core.poll() end
  return not core.alive()
end

local function has_ipv6()
  local h = core.tcp_new()
  local ok = h:bind("::1", 0)
  h:close()
  settle()
  return ok == true
end

local function tmp_path(name)
  local unique = os.tmpname() -- (a file it creates: only its name is wanted)
  os.remove(unique)
  return unique .. "-" .. name .. ".sock"
end

-- A listening echo server on 127.0.0.1; returns server, port.
local function echo_server(opts)
  local server = net.createServer(opts, function(sock)
    sock:on("data", function(d) sock:write(d) end)
  end)
  local ready = false
  server:listen(0, "127.0.0.1", function() ready = true end)
  assert.is_true(run_until(function() return ready end))
  return server, server:address().port
end

local function close_server(server)
  local closed = false
  server:close(function() closed = true end)
  assert.is_true(run_until(function() return closed end), "server 'close' never came")
end

-- A server on 127.0.0.1 with `opts` and one client connection to it; `on_client(c)`
-- runs as soon as the client exists. Returns server, client, the accepted socket.
local function accept_one(opts, on_client)
  local accepted
  local server = net.createServer(opts, function(s) accepted = s end)
  server:listen(0, "127.0.0.1")
  local c = net.connect(server:address().port, "127.0.0.1")
  if on_client then on_client(c) end
  assert.is_true(run_until(function() return accepted ~= nil end))
  return server, c, accepted
end

-- accept_one's teardown: both ends of the connection, then the server.
local function close_accepted(server, c, accepted)
  c:destroy()
  accepted:destroy()
  close_server(server)
end

-- The server's connection count, as getConnections reports it.
local function connection_count(server)
  local count
  server:getConnections(function(_, n) count = n end)
  assert.is_true(run_until(function() return count ~= nil end))
  return count
end

-- A port that nothing listens on (bound once, then released).
local function free_port()
  local h = core.tcp_new()
  h:bind("127.0.0.1", 0)
  h:listen(1, function() end)
  local port = h:getsockname().port
  h:close()
  settle()
  return port
end

describe("cluster.net", function()
  local idle_before
  before_each(function() idle_before = settle() end)
  after_each(function()
    if idle_before then assert.is_true(settle(), "a handle was left open") end
  end)

  describe("server:listen", function()
    it("listen(0) picks a free port and address() reports it", function()
      local server = net.createServer()
      local listened = false
      server:listen(0, "127.0.0.1", function() listened = true end)
      assert.is_true(server.listening)
      local a = server:address()
      assert.are.equal("127.0.0.1", a.address)
      assert.are.equal("IPv4", a.family)
      assert.is_true(a.port > 0)
      assert.is_true(run_until(function() return listened end))
      close_server(server)
      assert.is_false(server.listening)
      assert.is_nil(server:address())
    end)

    it("takes an empty host as none, as Node does: listen on every interface, connect to localhost", function()
      local server = net.createServer(function(sock) sock:close("ok") end)
      server:listen(0, "")
      local a = server:address()
      assert.is_true(a.address == "::" or a.address == "0.0.0.0", a.address)
      local got = ""
      local c = net.connect(a.port, "")
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "ok" end))
      assert.are.equal("127.0.0.1", c.remoteAddress)
      close_server(server)
    end)

    it("refuses a unix path with a NUL byte (a Linux abstract name, which libuv would cut short), naming the argument", function()
      local ok, err = pcall(net.createServer().listen, net.createServer(), "\0luacluster-abstract")
      assert.is_false(ok)
      assert.matches("server:listen: bad argument #1 (path): must not contain a NUL byte", err, 1, true)
      ok, err = pcall(net.connect, { path = "\0luacluster-abstract" })
      assert.is_false(ok)
      assert.matches("net.connect: bad argument #1 (path): must not contain a NUL byte", err, 1, true)
    end)

    it("emits 'listening' after listen returns, never inside it", function()
      local server = net.createServer()
      local events = {}
      server:on("listening", function() events[#events + 1] = "listening" end)
      server:listen(0)
      events[#events + 1] = "returned"
      assert.is_true(run_until(function() return #events == 2 end))
      assert.are.same({ "returned", "listening" }, events)
      close_server(server)
    end)

    it("listen() with no host listens on every interface", function()
      local server = net.createServer()
      server:listen()
      local a = server:address()
      assert.is_true(a.address == "::" or a.address == "0.0.0.0")
      assert.is_true(a.port > 0)
      local connected = false
      local c
      c = net.connect(a.port, "127.0.0.1", function() connected = true end)
      assert.is_true(run_until(function() return connected end))
      c:destroy()
      close_server(server)
    end)

    it("accepts (port, host, backlog, callback) and a numeric string port", function()
      local server = net.createServer()
      local listened = false
      server:listen("0", "127.0.0.1", 16, function() listened = true end)
      assert.is_true(run_until(function() return listened end))
      assert.is_true(server:address().port > 0)
      close_server(server)
    end)

    it("accepts an options table {port=, host=, backlog=}", function()
      local server = net.createServer()
      local listened = false
      server:listen({ port = 0, host = "127.0.0.1", backlog = 8 }, function() listened = true end)
      assert.is_true(run_until(function() return listened end))
      assert.are.equal("127.0.0.1", server:address().address)
      close_server(server)
    end)

    it("listens on a unix socket path and address() returns the path", function()
      local path = tmp_path("listen")
      local server = net.createServer(function(sock)
        sock:on("data", function(d) sock:write(d) end)
      end)
      local listened = false
      server:listen(path, function() listened = true end)
      assert.is_true(run_until(function() return listened end))
      assert.are.equal(path, server:address())
      local got = ""
      local c = net.connect(path)
      c:on("connect", function() c:write("over unix") end)
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "over unix" end))
      c:destroy()
      close_server(server)
      os.remove(path:gsub("%-listen%.sock$", ""))
    end)

    it("listens on a unix socket given as {path=}", function()
      local path = tmp_path("opts")
      local server = net.createServer()
      local listened = false
      server:listen({ path = path }, function() listened = true end)
      assert.is_true(run_until(function() return listened end))
      assert.are.equal(path, server:address())
      close_server(server)
      assert.is_nil(io.open(path, "r"), "the socket file is removed on close")
      os.remove(path:gsub("%-opts%.sock$", ""))
    end)

    it("reports EADDRINUSE as an error object with code, errno, syscall, message, address, port", function()
      local a = net.createServer()
      a:listen(0, "127.0.0.1")
      local port = a:address().port
      local b = net.createServer()
      local err
      b:on("error", function(e) err = e end)
      b:listen(port, "127.0.0.1")
      assert.is_true(run_until(function() return err ~= nil end))
      assert.are.equal("EADDRINUSE", err.code)
      assert.are.equal("number", math.type(err.errno) and "number")
      assert.is_true(err.errno < 0)
      assert.are.equal("listen", err.syscall)
      assert.are.equal("listen EADDRINUSE 127.0.0.1:" .. port, err.message)
      assert.are.equal(err.message, tostring(err))
      assert.are.equal("127.0.0.1", err.address)
      assert.are.equal(port, err.port)
      assert.is_false(b.listening)
      close_server(a)
    end)

    it("reports EADDRINUSE on a unix path with the path", function()
      local path = tmp_path("inuse")
      local a = net.createServer()
      a:listen(path)
      local b = net.createServer()
      local err
      b:on("error", function(e) err = e end)
      b:listen(path)
      assert.is_true(run_until(function() return err ~= nil end))
      assert.are.equal("EADDRINUSE", err.code)
      assert.are.equal(path, err.path)
      close_server(a)
      os.remove(path:gsub("%-inuse%.sock$", ""))
    end)

    it("raises an 'error' nobody listens for out of the loop", function()
      local a = net.createServer()
      a:listen(0, "127.0.0.1")
      local b = net.createServer()
      b:listen(a:address().port, "127.0.0.1")
      local ok, msg = pcall(run_until, function() return false end, 2000)
      assert.is_false(ok)
      assert.matches("EADDRINUSE", tostring(msg))
      close_server(a)
    end)

    it("raises on bad arguments, naming the function and argument", function()
      local server = net.createServer()
      assert.has_error(function() server:listen(true) end,
        "server:listen: bad argument #1 (port): expected a port number, a path or an options table, got boolean")
      assert.has_error(function() server:listen(70000) end,
        "server:listen: bad argument #1 (port): must be in 0..65535, got 70000")
      assert.has_error(function() server:listen(0, "127.0.0.1", "x") end)
      -- a backlog listen(2) cannot take is the caller's error, not the C core's
      assert.has_error(function() server:listen({ port = 0, backlog = -1 }) end,
        "server:listen: bad argument #1 (backlog): must be in 0..2147483647, got -1")
      assert.has_error(function() server:listen(0, "127.0.0.1", 2 ^ 31) end,
        "server:listen: bad argument #3 (backlog): must be in 0..2147483647, got 2147483648.0")
      assert.has_error(function() net.createServer(42) end)
      assert.has_error(function() server:close(42) end)
      assert.is_false(server.listening)
    end)

    it("raises when listening twice", function()
      local server = net.createServer()
      server:listen(0, "127.0.0.1")
      assert.has_error(function() server:listen(0) end, "server:listen: the server is already listening")
      close_server(server)
    end)

    it("close(callback) on a server that is not listening passes an error", function()
      local server = net.createServer()
      local err
      server:close(function(e) err = e end)
      assert.is_true(run_until(function() return err ~= nil end))
      assert.are.equal("ERR_SERVER_NOT_RUNNING", err.code)
    end)
  end)

  describe("connections", function()
    it("round-trips data through an echo server and fills in the addresses", function()
      local server, port = echo_server()
      local accepted
      server:on("connection", function(s) accepted = s end)
      local got, connected = "", false
      local c
      c = net.connect(port, "127.0.0.1", function() connected = true end)
      c:on("data", function(d) got = got .. d end)
      c:on("connect", function() c:write("hello ") c:write("world") end)
      assert.is_true(run_until(function() return got == "hello world" end))
      assert.is_true(connected)
      assert.are.equal("127.0.0.1", c.remoteAddress)
      assert.are.equal(port, c.remotePort)
      assert.are.equal("IPv4", c.remoteFamily)
      assert.are.equal("127.0.0.1", c.localAddress)
      assert.is_true(c.localPort > 0)
      assert.are.equal(c.localPort, accepted.remotePort)
      assert.are.equal(port, accepted.localPort)
      assert.are.equal(11, c.bytesWritten)
      assert.are.equal(11, c.bytesRead)
      c:destroy()
      close_server(server)
    end)

    it("connects with an options table and defaults the host to localhost", function()
      local server, port = echo_server()
      local n = 0
      local c1 = net.connect({ port = port, host = "127.0.0.1" }, function() n = n + 1 end)
      local c2 = net.createConnection(port, function() n = n + 1 end)
      assert.is_true(run_until(function() return n == 2 end))
      c1:destroy()
      c2:destroy()
      close_server(server)
    end)

    it("buffers writes made while connecting", function()
      local server, port = echo_server()
      local got = ""
      local c = net.connect(port, "127.0.0.1")
      assert.is_true(c.connecting)
      assert.is_true(c:write("early"))
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "early" end))
      assert.is_false(c.connecting)
      c:destroy()
      close_server(server)
    end)

    it("runs write callbacks after the data is written, never inside write", function()
      local server, port = echo_server()
      local order = {}
      local c = net.connect(port, "127.0.0.1")
      c:on("connect", function()
        c:write("x", function(err) order[#order + 1] = err == nil and "cb" or tostring(err) end)
        order[#order + 1] = "returned"
      end)
      assert.is_true(run_until(function() return #order == 2 end))
      assert.are.same({ "returned", "cb" }, order)
      c:destroy()
      close_server(server)
    end)

    it("reports ECONNREFUSED with address and port", function()
      local port = free_port()
      local c = net.connect(port, "127.0.0.1")
      local err, closed
      c:on("error", function(e) err = e end)
      c:on("close", function(had_error) closed = had_error end)
      assert.is_true(run_until(function() return closed ~= nil end))
      assert.are.equal("ECONNREFUSED", err.code)
      assert.are.equal("connect", err.syscall)
      assert.are.equal("connect ECONNREFUSED 127.0.0.1:" .. port, err.message)
      assert.are.equal("127.0.0.1", err.address)
      assert.are.equal(port, err.port)
      assert.is_true(closed)
    end)

    it("names the address tried, not \"localhost\", in a connect or listen error (as Node)", function()
      local port = free_port()
      local err
      net.connect(port):on("error", function(e) err = e end) -- (the host defaults to localhost)
      assert.is_true(run_until(function() return err ~= nil end))
      assert.are.equal("ECONNREFUSED", err.code)
      assert.are.equal("127.0.0.1", err.address)
      assert.are.equal("connect ECONNREFUSED 127.0.0.1:" .. port, err.message)
      local taken = net.createServer()
      taken:listen(0, "127.0.0.1")
      local used = taken:address().port
      local lerr
      net.createServer():on("error", function(e) lerr = e end):listen(used, "localhost")
      assert.is_true(run_until(function() return lerr ~= nil end))
      assert.are.equal("EADDRINUSE", lerr.code)
      assert.are.equal("127.0.0.1", lerr.address)
      assert.are.equal("listen EADDRINUSE 127.0.0.1:" .. used, lerr.message)
      close_server(taken)
      -- through the resolver too: "127.1" is tried as 127.0.0.1
      local rerr
      net.connect(port, "127.1"):on("error", function(e) rerr = e end)
      assert.is_true(run_until(function() return rerr ~= nil end))
      assert.are.equal("127.0.0.1", rerr.address)
      assert.are.equal(port, rerr.port)
      assert.are.equal("connect ECONNREFUSED 127.0.0.1:" .. port, rerr.message)
    end)

    it("resolves a host name through the resolver", function()
      local server, port = echo_server()
      local connected = false
      local c
      -- "127.1" is not a numeric address for inet_pton, but getaddrinfo knows it
      c = net.connect(port, "127.1", function() connected = true end)
      assert.is_true(run_until(function() return connected end))
      assert.are.equal("127.0.0.1", c.remoteAddress)
      c:destroy()
      close_server(server)
    end)

    it("reports an unknown host as ENOTFOUND", function()
      local err
      local c = net.connect(80, "no-such-host.invalid")
      c:on("error", function(e) err = e end)
      assert.is_true(run_until(function() return err ~= nil end, 10000))
      assert.is_true(err.code == "ENOTFOUND" or err.code == "EAI_AGAIN", err.code)
      assert.are.equal("getaddrinfo", err.syscall)
      assert.are.equal("no-such-host.invalid", err.hostname or err.address)
      assert.is_true(run_until(function() return c.destroyed end))
    end)

    it("fails a write to a vanished peer with an error instead of SIGPIPE", function()
      local server = net.createServer(function(sock) sock:destroy() end)
      server:listen(0, "127.0.0.1")
      local err, closed = nil, false
      local c = net.connect({ port = server:address().port, host = "127.0.0.1", allowHalfOpen = true })
      c:on("data", function() end)
      c:on("error", function(e) err = e end)
      c:on("close", function() closed = true end)
      local t = core.timer()
      c:on("end", function()
        t:start(0, 10, function()
          if c.destroyed then t:stop() return end
          c:write(string.rep("x", 65536))
        end)
      end)
      assert.is_true(run_until(function() return closed end))
      t:close()
      assert.is_true(err.code == "EPIPE" or err.code == "ECONNRESET", err.code)
      assert.are.equal("write", err.syscall)
      close_server(server)
    end)

    it("returns false on a large write and emits 'drain'; every byte arrives", function()
      local received, drained = 0, false
      local server = net.createServer(function(sock)
        sock:on("data", function(d) received = received + #d end)
      end)
      server:listen(0, "127.0.0.1")
      local port = server:address().port
      local size = 8 * 1024 * 1024
      local data = string.rep("0123456789abcdef", size // 16)
      local ret
      local c
      c = net.connect(port, "127.0.0.1", function()
        ret = c:write(data)
      end)
      c:on("drain", function() drained = true end)
      assert.is_true(run_until(function() return drained and received == size end, 10000))
      assert.is_false(ret)
      c:destroy()
      close_server(server)
    end)

    it("checks every byte of a multi-megabyte echo", function()
      local server, port = echo_server()
      local parts = {}
      for i = 1, 40000 do parts[i] = string.format("%08d", i) end
      local data = table.concat(parts)
      local got = {}
      local n = 0
      local c = net.connect(port, "127.0.0.1")
      c:on("data", function(d) got[#got + 1] = d n = n + #d end)
      c:on("connect", function() c:write(data) end)
      assert.is_true(run_until(function() return n == #data end, 10000))
      assert.are.equal(data, table.concat(got))
      c:destroy()
      close_server(server)
    end)

    it("close(data) writes everything queued before ending", function()
      local size = 4 * 1024 * 1024
      local server = net.createServer(function(sock)
        sock:close(string.rep("z", size))
      end)
      server:listen(0, "127.0.0.1")
      local got, ended, closed = 0, false, false
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("data", function(d) got = got + #d end)
      c:on("end", function() ended = true end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return closed end, 10000))
      assert.are.equal(size, got)
      assert.is_true(ended)
      close_server(server)
    end)

    it("destroySoon() closes once the data is written, without waiting for the peer to end: 'finish' then 'close'", function()
      local server_events, server_sock = {}, nil
      local server = net.createServer(function(sock)
        server_sock = sock
        sock:on("close", function(had_error) server_events[#server_events + 1] = "close:" .. tostring(had_error) end)
        assert.is_true(sock._calm) -- (internal: the short path closes it)
        sock:write("bye")
        sock:destroySoon()
        assert.are.same({}, server_events) -- events come later, never inside the call
        assert.is_true(sock.destroyed)
        assert.is_false(sock:write("more")) -- nothing more goes out
        sock:destroySoon() -- a second call changes nothing
        sock:on("finish", function() server_events[#server_events + 1] = "finish" end) -- (added after: still called)
      end)
      server:listen(0, "127.0.0.1")
      -- the client keeps its writing side open: the server must not wait for it
      local got, ended = "", false
      local c = net.connect({ port = server:address().port, host = "127.0.0.1", allowHalfOpen = true })
      c:on("data", function(d) got = got .. d end)
      c:on("end", function() ended = true end)
      assert.is_true(run_until(function() return ended and #server_events == 2 end))
      run_for(20)
      assert.are.equal("bye", got)
      assert.are.same({ "finish", "close:false" }, server_events)
      assert.are.equal(3, server_sock.bytesWritten)
      assert.are.equal(0, connection_count(server))
      c:destroy()
      close_server(server)
    end)

    it("destroySoon() after close() waits for the end to finish: every byte arrives, one 'finish'", function()
      local size = 4 * 1024 * 1024
      local events = {}
      local server = net.createServer(function(sock)
        sock:on("finish", function() events[#events + 1] = "finish" end)
        sock:on("close", function() events[#events + 1] = "close" end)
        sock:close(string.rep("q", size))
        sock:destroySoon()
      end)
      server:listen(0, "127.0.0.1")
      local got, closed = 0, false
      local c = net.connect({ port = server:address().port, host = "127.0.0.1", allowHalfOpen = true })
      c:on("data", function(d) got = got + #d end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return #events == 2 end, 10000))
      assert.are.same({ "finish", "close" }, events)
      assert.is_true(run_until(function() return got == size end, 10000))
      c:destroy()
      assert.is_true(run_until(function() return closed end))
      close_server(server)
    end)

    it("pauseOnConnect: nothing is read until resume()", function()
      local server, c, sock = accept_one({ pauseOnConnect = true }, function(client)
        client:on("connect", function() client:write("early") end)
      end)
      run_for(50)
      assert.are.equal(0, sock.bytesRead)
      local got = ""
      sock:on("data", function(d) got = got .. d end)
      run_for(30)
      assert.are.equal("", got)
      sock:resume()
      assert.is_true(run_until(function() return got == "early" end))
      c:destroy()
      sock:destroy()
      close_server(server)
    end)

    it("destroySoon() after a large write sends every byte first", function()
      local size = 4 * 1024 * 1024
      local server_closed = false
      local server = net.createServer(function(sock)
        sock:on("close", function() server_closed = true end)
        assert.is_false(sock:write(string.rep("y", size))) -- queued in libuv
        sock:destroySoon()
      end)
      server:listen(0, "127.0.0.1")
      local got, closed = 0, false
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("data", function(d) got = got + #d end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return closed and server_closed end, 10000))
      assert.are.equal(size, got)
      close_server(server)
    end)

    it("destroySoon() on a connecting socket ends it once connected", function()
      local server_got, server_ended = "", false
      local server = net.createServer(function(sock)
        sock:on("data", function(d) server_got = server_got .. d end)
        sock:on("end", function() server_ended = true end)
      end)
      server:listen(0, "127.0.0.1")
      local closed = nil
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("close", function(had_error) closed = had_error end)
      local finishes = 0
      c:on("finish", function() finishes = finishes + 1 end)
      c:write("queued while connecting")
      c:destroySoon()
      c:destroySoon() -- a second call changes nothing: one 'finish'
      assert.is_true(run_until(function() return closed ~= nil and server_ended end))
      assert.are.equal("queued while connecting", server_got)
      assert.is_false(closed)
      assert.are.equal(1, finishes)
      close_server(server)
    end)

    describe("bytes that arrived before the connection was accepted", function()
      -- the client runs while this process's loop is blocked in os.execute, so the
      -- connection waits in the backlog with its bytes (and its FIN) before the accept
      local function blocked_client(port, payload)
        local cmd = ("exec 3<>/dev/tcp/127.0.0.1/%d; printf '%s' >&3; exec 3>&-"):format(port, payload)
        assert(os.execute("bash -c " .. ("%q"):format(cmd)))
      end

      local function record(server_opts, on_connection)
        local events = {}
        local server = net.createServer(server_opts, function(sock)
          events[#events + 1] = "connection"
          sock:on("data", function(d) events[#events + 1] = "data:" .. d end)
          sock:on("end", function() events[#events + 1] = "end" end)
          sock:on("close", function() events[#events + 1] = "close" end)
          if on_connection then on_connection(sock, events) end
        end)
        server:listen(0, "127.0.0.1")
        return server, server:address().port, events
      end

      it("reach 'data' once, in order, then 'end' and 'close'", function()
        local server, port, events = record()
        blocked_client(port, "hello")
        assert.is_true(run_until(function() return events[#events] == "close" end))
        assert.are.same({ "connection", "data:hello", "end", "close" }, events)
        close_server(server)
      end)

      it("a connection ended before it was accepted gives 'end' and 'close', no 'data'", function()
        local server, port, events = record()
        blocked_client(port, "")
        assert.is_true(run_until(function() return events[#events] == "close" end))
        assert.are.same({ "connection", "end", "close" }, events)
        close_server(server)
      end)

      it("are read in the turn that accepted them, unless the process's recent connections had none: then 16 wait for the poll", function()
        local loop = require "cluster.loop"
        local order = {}
        local server = net.createServer(function(sock)
          local tag = #order + 1
          order[tag] = {}
          loop.defer(function() table.insert(order[tag], "next turn") end)
          sock:on("data", function(d) table.insert(order[tag], d) end)
        end)
        server:listen(0, "127.0.0.1")
        local port = server:address().port
        local silent = {}
        finally(function()
          for _, c in pairs(silent) do c:destroy() end
          close_server(server)
        end)
        local function served_by(payload)
          blocked_client(port, payload)
          local n = #order + 1
          assert.is_true(run_until(function() return order[n] and #order[n] == 2 end))
          return order[n]
        end
        assert.are.same({ "a", "next turn" }, served_by("a"))
        -- two clients that stay silent: the reads they cost find nothing
        for i = 1, 2 do
          local n = #order + 1
          silent[i] = net.connect(port, "127.0.0.1")
          assert.is_true(run_until(function() return order[n] and #order[n] == 1 end))
        end
        for i = 1, 16 do assert.are.same({ "next turn", "b" .. i }, served_by("b" .. i)) end
        assert.are.same({ "c", "next turn" }, served_by("c"))
        -- the score counts no more than 8 reads that found bytes: after 12 of them,
        -- 9 silent clients are enough to stop the first reads in the turn again
        for i = 1, 12 do assert.are.same({ "d" .. i, "next turn" }, served_by("d" .. i)) end
        for i = 3, 11 do
          local n = #order + 1
          silent[i] = net.connect(port, "127.0.0.1")
          assert.is_true(run_until(function() return order[n] and #order[n] == 1 end))
        end
        assert.are.same({ "next turn", "e" }, served_by("e"))
      end)

      it("wait while the 'connection' listener paused the socket", function()
        local paused
        local server, port, events = record(nil, function(sock) paused = sock sock:pause() end)
        blocked_client(port, "later")
        assert.is_true(run_until(function() return paused ~= nil end))
        run_for(50)
        assert.are.same({ "connection" }, events)
        paused:resume()
        assert.is_true(run_until(function() return events[#events] == "close" end))
        assert.are.same({ "connection", "data:later", "end", "close" }, events)
        close_server(server)
      end)
    end)

    it("emits 'end' then 'close' when the peer ends", function()
      local server = net.createServer(function(sock) sock:close("bye") end)
      server:listen(0, "127.0.0.1")
      local events = {}
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("data", function(d) events[#events + 1] = "data:" .. d end)
      c:on("end", function() events[#events + 1] = "end" end)
      c:on("close", function(had_error) events[#events + 1] = "close:" .. tostring(had_error) end)
      assert.is_true(run_until(function() return #events == 3 end))
      assert.are.same({ "data:bye", "end", "close:false" }, events)
      close_server(server)
    end)

    it("ends its own side when the peer ends (allowHalfOpen false)", function()
      local server_closed = false
      local server = net.createServer(function(sock)
        sock:on("data", function() end)
        sock:on("close", function() server_closed = true end)
      end)
      server:listen(0, "127.0.0.1")
      local closed = false
      local c
      c = net.connect(server:address().port, "127.0.0.1", function() c:close() end)
      c:on("close", function() closed = true end)
      c:on("data", function() end)
      assert.is_true(run_until(function() return closed and server_closed end))
      close_server(server)
    end)

    it("keeps the writing side open with allowHalfOpen", function()
      local server = net.createServer({ allowHalfOpen = true }, function(sock)
        sock:on("data", function() end)
        sock:on("end", function() sock:close("after end") end)
      end)
      server:listen(0, "127.0.0.1")
      local got, closed = "", false
      local c
      c = net.connect(server:address().port, "127.0.0.1", function() c:close() end)
      c:on("data", function(d) got = got .. d end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return closed end))
      assert.are.equal("after end", got)
      close_server(server)
    end)

    it("destroy() closes at once: 'close' without error, the peer sees the end", function()
      local peer_ended, peer_closed = false, false
      local server = net.createServer(function(sock)
        sock:on("data", function() end)
        sock:on("end", function() peer_ended = true end)
        sock:on("close", function() peer_closed = true end)
      end)
      server:listen(0, "127.0.0.1")
      local closed
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("close", function(had_error) closed = had_error end)
      c:on("connect", function() c:destroy() end)
      assert.is_true(run_until(function() return closed ~= nil and peer_closed end))
      assert.is_false(closed)
      assert.is_true(c.destroyed)
      assert.is_true(peer_ended)
      assert.is_false(c:write("late"))
      close_server(server)
    end)

    it("destroy(err) emits 'error' then 'close'", function()
      local server = net.createServer()
      server:listen(0, "127.0.0.1")
      local events = {}
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("error", function(e) events[#events + 1] = "error:" .. e.code end)
      c:on("close", function(had_error) events[#events + 1] = "close:" .. tostring(had_error) end)
      c:destroy(net._uvError("ECONNRESET", "read"))
      assert.is_true(run_until(function() return #events == 2 end))
      assert.are.same({ "error:ECONNRESET", "close:true" }, events)
      close_server(server)
    end)

    it("pause() stops 'data' until resume()", function()
      local server_sock
      local got = ""
      local server = net.createServer(function(sock)
        server_sock = sock
        sock:pause()
        sock:on("data", function(d) got = got .. d end)
      end)
      server:listen(0, "127.0.0.1")
      local c
      c = net.connect(server:address().port, "127.0.0.1", function() c:write("while paused") end)
      assert.is_true(run_until(function() return server_sock ~= nil end))
      run_for(200)
      assert.are.equal("", got)
      assert.is_true(server_sock:isPaused())
      server_sock:resume()
      assert.is_true(run_until(function() return got == "while paused" end))
      c:destroy()
      close_server(server)
    end)

    it("keeps data that arrives before a 'data' listener is added", function()
      local server_sock
      local server = net.createServer(function(sock) server_sock = sock end)
      server:listen(0, "127.0.0.1")
      local c
      c = net.connect(server:address().port, "127.0.0.1", function() c:close("early bird") end)
      assert.is_true(run_until(function() return server_sock ~= nil end))
      run_for(200)
      local got, ended = "", false
      server_sock:on("end", function() ended = true end)
      server_sock:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return ended end))
      assert.are.equal("early bird", got)
      close_server(server)
    end)

    it("server close waits for its connections before 'close'", function()
      local server_sock
      local server = net.createServer(function(sock)
        server_sock = sock
        sock:on("data", function(d) sock:write(d) end)
      end)
      server:listen(0, "127.0.0.1")
      local port = server:address().port
      local got = ""
      local c = net.connect(port, "127.0.0.1")
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return server_sock ~= nil end))
      local server_closed = false
      server:close(function() server_closed = true end)
      assert.is_false(server.listening)
      -- no new connections
      local refused
      local c2 = net.connect(port, "127.0.0.1")
      c2:on("error", function(e) refused = e.code end)
      assert.is_true(run_until(function() return refused ~= nil end))
      assert.are.equal("ECONNREFUSED", refused)
      -- the existing connection still works and the server has not closed
      c:write("still here")
      assert.is_true(run_until(function() return got == "still here" end))
      run_for(100)
      assert.is_false(server_closed)
      assert.are.equal(1, connection_count(server))
      c:close()
      assert.is_true(run_until(function() return server_closed end))
    end)

    it("counts each connection once however it ends: destroyed twice, destroyed with an error, ended by the peer", function()
      local socks = {}
      local server = net.createServer(function(sock)
        socks[#socks + 1] = sock
        sock:on("error", function() end)
      end)
      server:listen(0, "127.0.0.1")
      local port = server:address().port
      local clients = {}
      for i = 1, 3 do
        clients[i] = net.connect(port, "127.0.0.1")
        clients[i]:on("error", function() end)
      end
      assert.is_true(run_until(function() return #socks == 3 end))
      assert.are.equal(3, connection_count(server))
      local closes = 0
      for _, sock in ipairs(socks) do sock:on("close", function() closes = closes + 1 end) end
      socks[1]:destroy()
      socks[1]:destroy()
      socks[2]:destroy({ code = "EFAKE", message = "fake" })
      assert.is_true(run_until(function() return closes == 2 end))
      assert.are.equal(1, connection_count(server))
      local server_closed = 0
      server:close(function() server_closed = server_closed + 1 end)
      clients[3]:close()
      assert.is_true(run_until(function() return closes == 3 and server_closed == 1 end))
      assert.are.equal(0, connection_count(server))
      run_for(50)
      assert.are.equal(1, server_closed)
      assert.are.equal(3, closes)
    end)

    it("an accepted socket starts from the class's field values and holds its own once set", function()
      local server, c, accepted = accept_one({ allowHalfOpen = true })
      assert.are.equal(false, accepted.destroyed)
      assert.are.equal(false, accepted.connecting)
      assert.are.equal(true, accepted.allowHalfOpen)
      assert.are.equal(0, accepted.bytesRead)
      assert.are.equal(server, accepted.server)
      assert.are.equal("127.0.0.1", accepted.remoteAddress)
      local other = net.Socket.new()
      assert.are.equal(false, other.allowHalfOpen) -- not the accepted socket's
      assert.are.equal(false, other.destroyed)
      c:write("abc")
      assert.is_true(run_until(function() return accepted.bytesRead == 3 end))
      assert.are.equal(0, net.Socket.bytesRead) -- the class's value is untouched
      accepted:destroy()
      assert.are.equal(true, accepted.destroyed)
      assert.are.equal(false, net.Socket.destroyed)
      c:destroy()
      close_server(server)
    end)

    describe("a calm connection's short paths", function()
      -- (_calm is internal: these specs check that the short paths are taken where they
      -- should be, and that every way off them behaves as the general paths do)

      it("an accepted socket reads and writes on them; a bad write still raises socket:write's error", function()
        local server, c, accepted = accept_one()
        assert.is_true(accepted._calm)
        local got = ""
        accepted:on("data", function(d) got = got .. d end)
        assert.is_true(accepted._calm) -- a 'data' listener on a reading socket changes nothing
        assert.has_error(function() accepted:write(42) end,
          "socket:write: bad argument #1 (data): expected a string, got number")
        assert.has_error(function() accepted:write({}) end,
          "socket:write: bad argument #1 (data): expected a string, got table")
        assert.are.equal(0, accepted.bytesWritten)
        local echoed = ""
        c:on("data", function(d) echoed = echoed .. d end)
        assert.is_true(accepted:write("pong"))
        assert.are.equal(4, accepted.bytesWritten)
        c:write("ping")
        assert.is_true(run_until(function() return got == "ping" and echoed == "pong" end))
        assert.are.equal(4, accepted.bytesRead)
        assert.is_true(accepted._calm)
        close_accepted(server, c, accepted)
      end)

      it("pause, buffered chunks and an idle timeout leave them; resume comes back, a socket that had a timeout stays off", function()
        local server, c, accepted = accept_one()
        local got = ""
        c:write("one")
        assert.is_true(run_until(function() return accepted.bytesRead == 3 end))
        assert.is_false(accepted._calm) -- a chunk with no 'data' listener waits in the buffer
        accepted:on("data", function(d) got = got .. d end)
        assert.is_true(run_until(function() return got == "one" end))
        assert.is_true(accepted._calm)

        accepted:pause()
        assert.is_false(accepted._calm)
        c:write("two")
        run_for(50)
        assert.are.equal("one", got)
        accepted:resume()
        assert.is_true(run_until(function() return got == "onetwo" end))
        assert.is_true(accepted._calm)

        local timeouts = 0
        accepted:setTimeout(30, function() timeouts = timeouts + 1 end)
        assert.is_false(accepted._calm)
        c:write("three") -- read and written on the general paths, which count activity
        assert.is_true(accepted:write("four"))
        assert.is_true(run_until(function() return got == "onetwothree" end))
        accepted:setTimeout(0)
        assert.is_false(accepted._calm) -- (its timer stays, stopped, for the next setTimeout)
        c:write("five")
        assert.is_true(run_until(function() return got == "onetwothreefive" end))
        run_for(80)
        assert.are.equal(0, timeouts)
        assert.are.equal(15, accepted.bytesRead)
        assert.are.equal(4, accepted.bytesWritten)
        close_accepted(server, c, accepted)
      end)

      it("close() leaves them: a write after it fails as after any close()", function()
        local server, c, accepted = accept_one()
        local err
        accepted:on("error", function(e) err = e end)
        accepted:close()
        assert.is_false(accepted._calm)
        assert.is_false(accepted:write("late"))
        assert.is_true(run_until(function() return err ~= nil end))
        assert.are.equal("ERR_STREAM_WRITE_AFTER_END", err.code)
        close_accepted(server, c, accepted)
      end)
    end)

    it("sets socket options (setNoDelay, setKeepAlive) without failing", function()
      local server, port = echo_server()
      local c = net.connect(port, "127.0.0.1")
      c:setNoDelay(true)
      c:setKeepAlive(true, 1000)
      local connected = false
      c:on("connect", function()
        c:setNoDelay(false)
        c:setKeepAlive(false)
        connected = true
      end)
      assert.is_true(run_until(function() return connected end))
      assert.are.equal("127.0.0.1", c:address().address)
      c:destroy()
      close_server(server)
    end)

    it("raises on bad write arguments", function()
      local c = net.Socket.new()
      assert.has_error(function() c:write(42) end,
        "socket:write: bad argument #1 (data): expected a string, got number")
      assert.has_error(function() c:write("x", 42) end,
        "socket:write: bad argument #2 (callback): expected a function, got number")
      assert.has_error(function() net.connect(true) end)
    end)

    it("a write after close() destroys the socket (Node's write after end): its callback, 'error', then 'close'(true)", function()
      local server, port = echo_server()
      local events = {}
      local c = net.connect(port, "127.0.0.1")
      c:on("error", function(e) events[#events + 1] = "error " .. e.code end)
      c:on("finish", function() events[#events + 1] = "finish" end)
      c:on("close", function(had_error) events[#events + 1] = "close " .. tostring(had_error) end)
      c:on("connect", function()
        c:close()
        assert.is_false(c:write("too late", function(e) events[#events + 1] = "callback " .. e.code end))
        assert.is_true(c.destroyed)
        -- destroyed now: a later write's callback gets ERR_STREAM_DESTROYED, and no 'error'
        assert.is_false(c:write("later", function(e) events[#events + 1] = "callback " .. e.code end))
      end)
      assert.is_true(run_until(function() return #events == 4 end))
      assert.are.same({ "callback ERR_STREAM_WRITE_AFTER_END", "error ERR_STREAM_WRITE_AFTER_END",
                        "close true", "callback ERR_STREAM_DESTROYED" }, events)
      close_server(server)
    end)

    it("close(data) after close() is a write after end; the callbacks of both calls are answered", function()
      local server, port = echo_server()
      local events = {}
      local c = net.connect(port, "127.0.0.1")
      c:on("error", function(e) events[#events + 1] = "error " .. e.code end)
      c:on("close", function(had_error) events[#events + 1] = "close " .. tostring(had_error) end)
      c:on("connect", function()
        c:close("first", function(e) events[#events + 1] = "first " .. (e and e.code or "ok") end)
        c:close("second", function(e) events[#events + 1] = "second " .. (e and e.code or "ok") end)
      end)
      assert.is_true(run_until(function() return #events == 4 end))
      -- the socket was destroyed before its writing side closed: the first callback
      -- gets that error too, never silence
      assert.are.same({ "second ERR_STREAM_WRITE_AFTER_END", "first ERR_STREAM_WRITE_AFTER_END",
                        "error ERR_STREAM_WRITE_AFTER_END", "close true" }, events)
      close_server(server)
    end)

    it("close(callback) again runs on the 'finish' to come, or gets ERR_STREAM_ALREADY_FINISHED / ERR_STREAM_DESTROYED", function()
      local server, port = echo_server()
      local events = {}
      local function note(name) return function(e) events[#events + 1] = name .. " " .. (e and e.code or "ok") end end
      local c = net.connect({ port = port, host = "127.0.0.1", allowHalfOpen = true })
      c:on("finish", function()
        events[#events + 1] = "finish"
        c:close(note("after finish"))
      end)
      c:on("connect", function()
        c:close(note("first"))
        c:close(note("second"))
      end)
      assert.is_true(run_until(function() return #events == 4 end))
      assert.are.same({ "first ok", "second ok", "finish", "after finish ERR_STREAM_ALREADY_FINISHED" }, events)
      -- a socket destroyed before it ever ended
      local d = net.Socket.new()
      d:destroy()
      local got
      d:close(function(e) got = e end)
      assert.is_true(run_until(function() return got ~= nil end))
      assert.are.equal("ERR_STREAM_DESTROYED", got.code)
      c:destroy()
      close_server(server)
    end)

    it("a connection that fails answers the callbacks of its waiting writes and of close() before 'error' and 'close'", function()
      local port = free_port()
      local events = {}
      local c = net.connect(port, "127.0.0.1")
      c:on("error", function(e) events[#events + 1] = "error " .. e.code end)
      c:on("close", function(had_error) events[#events + 1] = "close " .. tostring(had_error) end)
      c:write("x", function(e) events[#events + 1] = "write " .. (e and e.code or "ok") end)
      c:close(function(e) events[#events + 1] = "close callback " .. (e and e.code or "ok") end)
      assert.is_true(run_until(function() return #events == 4 end))
      assert.are.same({ "write ECONNREFUSED", "close callback ECONNREFUSED", "error ECONNREFUSED", "close true" }, events)
    end)

    it("a write after the peer ended a socket that is not half-open fails with EPIPE (Node's)", function()
      local server, c, accepted = accept_one()
      local err, wrote_err, closed
      accepted:on("data", function() end)
      accepted:on("error", function(e) err = e end)
      accepted:on("close", function(had_error) closed = had_error end)
      -- the peer's end made it close its own side: a write once that is done is late
      accepted:on("finish", function()
        accepted:write("late", function(e) wrote_err = e end)
      end)
      c:close()
      assert.is_true(run_until(function() return closed ~= nil and wrote_err ~= nil end))
      assert.are.equal("EPIPE", wrote_err.code)
      assert.are.equal("write", wrote_err.syscall)
      assert.are.equal("This socket has been ended by the other party", wrote_err.message)
      assert.are.equal(wrote_err, err)
      assert.is_true(closed)
      close_accepted(server, c, accepted)
    end)

    it("emits no 'drain' once close() was called", function()
      local received = 0
      local server = net.createServer(function(sock)
        sock:on("data", function(d) received = received + #d end)
      end)
      server:listen(0, "127.0.0.1")
      local size = 8 * 1024 * 1024
      local ret, drained, closed = nil, false, false
      local c
      c = net.connect(server:address().port, "127.0.0.1", function()
        ret = c:write(string.rep("d", size))
        c:close()
      end)
      c:on("drain", function() drained = true end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return closed and received == size end, 10000))
      assert.is_false(ret)
      assert.is_false(drained)
      close_server(server)
    end)
  end)

  describe("a client's own end: localAddress and localPort (Node's test-net-local-address-port, -connect-options-port)", function()
    -- accepts one connection from a client made with `opts` (port filled in); returns
    -- the server's socket and the client, both open
    local function connect_from(opts)
      local accepted
      local server = net.createServer(function(s) accepted = s end)
      server:listen(0, "127.0.0.1")
      opts.port = server:address().port
      local connected = false
      local c = net.connect(opts, function() connected = true end)
      assert.is_true(run_until(function() return accepted ~= nil and connected end))
      return server, c, accepted
    end

    it("binds the client to localAddress before connecting: both ends see that address", function()
      local server, c, accepted = connect_from { host = "127.0.0.1", localAddress = "127.0.0.2" }
      assert.equal("127.0.0.2", accepted.remoteAddress)
      assert.equal("127.0.0.2", c.localAddress)
      assert.equal(c.localPort, accepted.remotePort)
      assert.equal("127.0.0.2", c:address().address)
      close_accepted(server, c, accepted)
    end)

    it("binds the client to localPort (with or without localAddress)", function()
      for _, local_address in ipairs { "127.0.0.1", false } do
        local port = free_port()
        local server, c, accepted = connect_from { host = "127.0.0.1", localAddress = local_address or nil, localPort = port }
        assert.equal(port, accepted.remotePort)
        assert.equal(port, c.localPort)
        close_accepted(server, c, accepted)
      end
    end)

    it("a localAddress the host does not have: 'error' EADDRNOTAVAIL from bind, then 'close', and no connection", function()
      local accepted = false
      local server = net.createServer(function() accepted = true end)
      server:listen(0, "127.0.0.1")
      local c = net.connect { port = server:address().port, host = "127.0.0.1", localAddress = "192.0.2.1" }
      local err, closed, connected
      c:on("connect", function() connected = true end)
      c:on("error", function(e) err = e end)
      c:on("close", function(had_error) closed = had_error end)
      assert.is_true(run_until(function() return closed ~= nil end))
      assert.is_true(closed)
      assert.equal("EADDRNOTAVAIL", err.code)
      assert.equal("bind", err.syscall)
      assert.equal("192.0.2.1", err.address)
      assert.is_nil(connected)
      run_for(50)
      assert.is_false(accepted)
      close_server(server)
    end)

    it("a localPort in use: 'error' EADDRINUSE (libuv reports it from connect, as in Node)", function()
      local holder = net.createServer()
      holder:listen(0, "127.0.0.1")
      local taken = holder:address().port
      local server = net.createServer()
      server:listen(0, "127.0.0.1")
      local c = net.connect { port = server:address().port, host = "127.0.0.1", localAddress = "127.0.0.1", localPort = taken }
      local err, closed
      c:on("error", function(e) err = e end)
      c:on("close", function() closed = true end)
      assert.is_true(run_until(function() return closed end))
      assert.equal("EADDRINUSE", err.code)
      close_server(server)
      close_server(holder)
    end)

    it("a localAddress that is not an IP address, or a bad localPort, raises naming the function and option", function()
      local function raises(fn, pattern)
        local ok, msg = pcall(fn)
        assert.is_false(ok)
        assert.truthy(tostring(msg):find(pattern), tostring(msg))
      end
      raises(function() net.connect { port = 1, localAddress = "localhost" } end,
        'net%.connect: bad argument #1 %(localAddress%): expected an IP address, got "localhost"')
      raises(function() net.connect { port = 1, localAddress = 127 } end, "%(localAddress%): expected an IP address, got number")
      raises(function() net.connect { port = 1, localPort = 70000 } end, "net%.connect: bad argument #1 %(localPort%)")
      raises(function() net.connect { port = 1, localPort = "x" } end, "%(localPort%): expected a port number, got string")
      raises(function() net.Socket.new():connect { port = 1, localAddress = "::1::" } end, "socket:connect: bad argument #1 %(localAddress%)")
    end)

    it("net.isIP, isIPv4 and isIPv6 tell addresses from anything else", function()
      assert.equal(4, net.isIP("127.0.0.1"))
      assert.equal(6, net.isIP("::1"))
      assert.equal(6, net.isIP("::ffff:127.0.0.1"))
      for _, no in ipairs { "localhost", "1.2.3", "256.1.1.1", "", "::1::", "1.2.3.4\0", 1234 } do
        assert.equal(0, net.isIP(no), tostring(no))
      end
      assert.is_true(net.isIPv4("10.0.0.1"))
      assert.is_false(net.isIPv4("::1"))
      assert.is_true(net.isIPv6("fe80::1"))
      assert.is_false(net.isIPv6("10.0.0.1"))
    end)
  end)

  describe("server.maxConnections (Node's test-net-server-max-connections, -drop-connections)", function()
    -- n clients that stay connected; returns them once each is connected or closed
    local function clients(port, n)
      local list = {}
      for i = 1, n do
        local c = net.connect(port, "127.0.0.1")
        local rec = { sock = c, data = "" }
        c:on("data", function(d) rec.data = rec.data .. d end)
        c:on("error", function() end)
        c:on("close", function() rec.closed = true end)
        list[i] = rec
      end
      return list
    end

    it("accepts up to maxConnections; the rest are closed at once with 'drop' and their addresses", function()
      local accepted, drops = {}, {}
      local server = net.createServer(function(s)
        accepted[#accepted + 1] = s
        s:write("hello")
      end)
      server.maxConnections = 2
      server:on("drop", function(data) drops[#drops + 1] = data end)
      server:listen(0, "127.0.0.1")
      local port = server:address().port
      local list = clients(port, 4)
      assert.is_true(run_until(function() return #accepted == 2 and #drops == 2 end))
      assert.is_true(run_until(function()
        local closed = 0
        for _, rec in ipairs(list) do if rec.closed then closed = closed + 1 end end
        return closed == 2
      end))
      for _, rec in ipairs(list) do
        -- a dropped client got nothing and was closed; a served one got "hello" and is open
        if rec.closed then assert.equal("", rec.data) else assert.equal("hello", rec.data) end
      end
      for _, d in ipairs(drops) do
        assert.equal("127.0.0.1", d.remoteAddress)
        assert.equal("IPv4", d.remoteFamily)
        assert.is_true(d.remotePort > 0)
        assert.equal("127.0.0.1", d.localAddress)
        assert.equal(port, d.localPort)
      end
      assert.equal(2, connection_count(server))
      -- a served connection that ends makes room for one more
      accepted[1]:destroy()
      run_for(20)
      local more = clients(port, 1)
      assert.is_true(run_until(function() return more[1].data == "hello" end))
      assert.equal(2, #drops)
      for _, rec in ipairs(list) do rec.sock:destroy() end
      more[1].sock:destroy()
      close_server(server)
    end)

    it("maxConnections = 0 drops every connection; nil (the default) is no limit", function()
      local accepted, drops = 0, 0
      local server = net.createServer(function() accepted = accepted + 1 end)
      assert.is_nil(server.maxConnections)
      server.maxConnections = 0
      server:on("drop", function() drops = drops + 1 end)
      server:listen(0, "127.0.0.1")
      local port = server:address().port
      local list = clients(port, 3)
      assert.is_true(run_until(function() return drops == 3 end))
      assert.equal(0, accepted)
      server.maxConnections = nil
      local more = clients(port, 3)
      assert.is_true(run_until(function() return accepted == 3 end))
      assert.equal(3, drops)
      for _, rec in ipairs(list) do rec.sock:destroy() end
      for _, rec in ipairs(more) do rec.sock:destroy() end
      close_server(server)
    end)

    it("a unix-socket server drops without addresses", function()
      local path = tmp_path("max.sock")
      local got
      local server = net.createServer(function() end)
      server.maxConnections = 0
      server:on("drop", function(data) got = { data = data } end)
      server:listen(path)
      local c = net.connect({ path = path })
      c:on("error", function() end)
      assert.is_true(run_until(function() return got ~= nil end))
      assert.is_nil(got.data)
      c:destroy()
      close_server(server)
    end)

    it("a maxConnections that is not a number is an error naming it at the next connection, which is closed", function()
      local server = net.createServer(function() error("the connection must not be accepted") end)
      server.maxConnections = "10"
      server:listen(0, "127.0.0.1")
      local list = clients(server:address().port, 1)
      local ok, err = pcall(run_until, function() return list[1].closed end)
      assert.is_false(ok)
      assert.matches("^server.maxConnections: expected a number or nil, got string", tostring(err))
      -- the connection at hand was closed, not left open
      assert.is_true(run_until(function() return list[1].closed end))
      server:close()
    end)
  end)

  describe("socket:setTimeout (Node's test-net-socket-timeout, -settimeout)", function()
    it("emits 'timeout' once after the socket is idle that long, and leaves it open", function()
      local server, c, accepted = accept_one()
      local timeouts, once = 0, 0
      accepted:on("timeout", function() timeouts = timeouts + 1 end)
      accepted:setTimeout(30, function() once = once + 1 end) -- a one-time listener
      assert.equal(30, accepted.timeout)
      assert.is_true(run_until(function() return timeouts == 1 end))
      run_for(100)
      assert.equal(1, timeouts) -- once per idle spell, not every 30 ms
      assert.is_false(accepted.destroyed)
      -- activity starts a new spell: the next 'timeout' comes 30 ms after it
      local got = ""
      c:on("data", function(d) got = got .. d end)
      accepted:write("still here")
      assert.is_true(run_until(function() return got == "still here" end))
      assert.is_true(run_until(function() return timeouts == 2 end))
      assert.equal(1, once)
      close_accepted(server, c, accepted)
    end)

    it("reads and writes keep the socket from timing out; 'timeout' comes once they stop", function()
      local server, c, accepted = accept_one()
      local timeouts = 0
      accepted:on("data", function() end)
      accepted:setTimeout(80)
      accepted:on("timeout", function() timeouts = timeouts + 1 end)
      -- the peer writes every 10 ms for 300 ms: never 80 ms of silence
      local stop = false
      local function tick(n)
        if stop or n == 0 then stop = true return end
        c:write("x")
        require("cluster.loop").setTimeout(tick, 10, n - 1)
      end
      tick(30)
      assert.is_true(run_until(function() return stop end, 3000))
      assert.equal(0, timeouts)
      assert.is_true(run_until(function() return timeouts == 1 end))
      close_accepted(server, c, accepted)
    end)

    it("a large write draining to the peer is not idle; a write the peer never reads times out", function()
      local server, c, accepted = accept_one()
      local timeouts = 0
      accepted:on("timeout", function() timeouts = timeouts + 1 end)
      -- the peer reads slowly (a chunk, then a 4 ms pause): the 16 MiB write takes far
      -- longer than the 300 ms timeout to drain, and the server neither reads nor writes
      -- meanwhile; only the shrinking queue says it is not idle (libuv writes more only
      -- when the kernel's send buffer is a third empty, so the queue moves in steps)
      local size, got = 16 * 1024 * 1024, 0
      local payload = string.rep("z", size)
      local slow = true
      c:on("data", function(d)
        got = got + #d
        if slow then
          c:pause()
          require("cluster.loop").setTimeout(function() if slow then c:resume() end end, 4)
        end
      end)
      local started, took, during = core.hrtime(), nil, nil
      accepted:setTimeout(300)
      -- the callback runs once libuv handed the last byte to the kernel (the kernel's
      -- own buffer drains after that, unseen, as in Node)
      accepted:write(payload, function()
        took, during = core.hrtime() - started, timeouts
      end)
      assert.is_true(run_until(function() return got == size end, 30000))
      assert.is_truthy(took)
      slow = false
      c:pause()
      local before = timeouts -- (one may have come while the kernel's buffer drained)
      accepted:write(payload) -- the peer stopped reading: the queue stops shrinking
      assert.is_true(run_until(function() return timeouts == before + 1 end, 5000))
      assert.is_true(took > 0.6, "the transfer was too quick to tell (" .. took .. " s)")
      assert.equal(0, during)
      close_accepted(server, c, accepted)
    end)

    it("a write stuck when 'timeout' came, once drained, lets the socket time out again (once per spell)", function()
      local server, c, accepted = accept_one()
      c:pause()
      local timeouts = 0
      accepted:on("timeout", function() timeouts = timeouts + 1 end)
      accepted:setTimeout(50)
      local size, got = 32 * 1024 * 1024, 0
      accepted:write(string.rep("s", size)) -- more than the kernel's buffers hold
      assert.is_true(run_until(function() return timeouts == 1 end))
      run_for(200) -- still stuck: no second 'timeout'
      assert.are.equal(1, timeouts)
      assert.is_true(accepted._handle:write_queue_size() > 0)
      c:on("data", function(d) got = got + #d end)
      c:resume()
      assert.is_true(run_until(function() return got == size end, 10000))
      -- the queue drained: that was activity, and the idle spell after it times out
      assert.is_true(run_until(function() return timeouts == 2 end))
      close_accepted(server, c, accepted)
    end)

    it("setTimeout(0) turns it off and removes the callback; a destroyed socket never times out", function()
      local server, c, accepted = accept_one()
      local fired = {}
      local function cb() fired[#fired + 1] = "cb" end
      accepted:setTimeout(20, cb)
      accepted:setTimeout(0, cb)
      assert.equal(0, accepted.timeout)
      assert.equal(0, accepted:listenerCount("timeout"))
      run_for(80)
      assert.same({}, fired)
      c:setTimeout(20, function() fired[#fired + 1] = "client" end)
      c:destroy()
      run_for(80)
      assert.same({}, fired)
      accepted:destroy()
      close_server(server)
    end)

    it("times out a connection attempt that never completes, and the timer does not keep the loop alive", function()
      -- a listener whose backlog is full never completes more handshakes
      local h = core.tcp_new()
      h:bind("127.0.0.1", 0)
      h:listen(0, function() end)
      local port = h:getsockname().port
      local socks, timed_out = {}, nil
      for i = 1, 8 do
        local s = net.connect(port, "127.0.0.1")
        s:on("error", function() end)
        s:setTimeout(50, function()
          if not timed_out then timed_out = i end
          s:destroy()
        end)
        socks[i] = s
      end
      assert.is_true(run_until(function() return timed_out ~= nil end, 5000))
      for _, s in ipairs(socks) do s:destroy() end
      h:close()
      settle()
      -- an unref'd timer: a lone socket with a long timeout still lets the loop end
      assert.is_false(core.alive())
      local lone = net.Socket.new()
      lone:setTimeout(60000)
      assert.is_true(lone._idleTimer:active())
      assert.is_false(core.alive())
      lone:destroy()
    end)

    it("rejects a bad timeout or callback, naming the argument", function()
      local s = net.Socket.new()
      assert.has_error(function() s:setTimeout("10") end,
        "socket:setTimeout: bad argument #1 (timeout): expected a number of milliseconds, got string")
      assert.has_error(function() s:setTimeout(-1) end,
        "socket:setTimeout: bad argument #1 (timeout): must be >= 0 and < 2^53 milliseconds, got -1")
      assert.has_error(function() s:setTimeout(10, 5) end,
        "socket:setTimeout: bad argument #2 (callback): expected a function, got number")
    end)
  end)

  describe("IPv6", function()
    it("listens and connects on ::1 when the system has IPv6", function()
      if not has_ipv6() then
        pending("no IPv6 on this system")
        return
      end
      local server = net.createServer(function(sock)
        sock:on("data", function(d) sock:write(d) end)
      end)
      server:listen(0, "::1")
      local a = server:address()
      assert.are.equal("::1", a.address)
      assert.are.equal("IPv6", a.family)
      local got = ""
      local c
      c = net.connect(a.port, "::1", function() c:write("six") end)
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "six" end))
      assert.are.equal("IPv6", c.remoteFamily)
      assert.are.equal("::1", c.remoteAddress)
      c:destroy()
      close_server(server)
    end)

    it("ipv6Only keeps IPv4 clients out of ::", function()
      if not has_ipv6() then
        pending("no IPv6 on this system")
        return
      end
      local server = net.createServer()
      server:listen({ port = 0, host = "::", ipv6Only = true })
      local port = server:address().port
      local err
      local c = net.connect(port, "127.0.0.1")
      c:on("error", function(e) err = e end)
      assert.is_true(run_until(function() return err ~= nil end))
      assert.are.equal("ECONNREFUSED", err.code)
      close_server(server)
    end)
  end)

  describe("seams for the cluster layer", function()
    it("_setListening and _acceptStream serve connections accepted elsewhere", function()
      local raw = core.tcp_new()
      raw:bind("127.0.0.1", 0)
      local server = net.createServer(function(sock)
        sock:on("data", function(d) sock:write(d:upper()) end)
      end)
      raw:listen(8, function()
        server:_acceptStream(raw:accept())
      end)
      local port = raw:getsockname().port
      local listened, close_hook = false, false
      server._onClose = function() close_hook = true end
      server:on("listening", function() listened = true end)
      server:_setListening({ address = "127.0.0.1", family = "IPv4", port = port })
      assert.is_true(server.listening)
      assert.is_true(run_until(function() return listened end))
      assert.are.equal(port, server:address().port)
      local got = ""
      local c
      c = net.connect(port, "127.0.0.1", function() c:write("rr") end)
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "RR" end))
      c:destroy()
      raw:close()
      close_server(server)
      assert.is_true(close_hook)
    end)

    -- Pretends to be a cluster worker whose sharing layer records the requests.
    local function with_fake_worker(fn)
      local saved = package.loaded["cluster"]
      local calls = {}
      package.loaded["cluster"] = {
        isWorker = true,
        _shareListen = function(server, opts) calls[#calls + 1] = { server = server, opts = opts } end,
      }
      local ok, err = pcall(fn, calls)
      package.loaded["cluster"] = saved
      if not ok then error(err, 0) end
    end

    it("in a worker, listen hands normalized options to cluster._shareListen unless exclusive", function()
      with_fake_worker(function(calls)
        local server = net.createServer()
        assert.are.equal(server, server:listen(8123, "127.0.0.1", 64))
        assert.are.same({ port = 8123, host = "127.0.0.1", backlog = 64, exclusive = false, ipv6Only = false },
          calls[1].opts)
        assert.are.equal(server, calls[1].server)
        local s2 = net.createServer()
        s2:listen("/tmp/x.sock")
        assert.are.same({ path = "/tmp/x.sock", backlog = 511, exclusive = false, ipv6Only = false }, calls[2].opts)
        local s3 = net.createServer()
        s3:listen({ port = 0, host = "127.0.0.1", exclusive = true })
        assert.are.equal(2, #calls)
        assert.is_true(s3:address().port > 0)
        close_server(s3)
      end)
    end)

    it("close() during a shared listen emits 'close' and releases the share when the answer comes", function()
      with_fake_worker(function(calls)
        local server = net.createServer()
        server:listen(0)
        local closed, released = false, false
        server:close(function(err) closed = err == nil end)
        server._onClose = function() released = true end
        server:_setListening({ address = "::", family = "IPv6", port = 1 })
        assert.is_false(server.listening)
        assert.is_true(run_until(function() return closed end))
        assert.is_true(released)
        assert.is_nil(server:address())
      end)
    end)

    it("the core's accept brings the peer's address with the connection: IPv4 and IPv6", function()
      local hosts = { "127.0.0.1" }
      if has_ipv6() then hosts[2] = "::1" end
      for _, host in ipairs(hosts) do
        local raw = core.tcp_new()
        assert.is_true(raw:bind(host, 0))
        local got = {}
        raw:listen(8, function(err)
          assert.is_nil(err)
          local stream, address, port, family = raw:accept()
          got[#got + 1] = { address = address, port = port, family = family }
          stream:close()
        end)
        local clients, connected = {}, 0
        for i = 1, 3 do
          clients[i] = net.connect(raw:getsockname().port, host, function() connected = connected + 1 end)
        end
        assert.is_true(run_until(function() return #got == 3 and connected == 3 end))
        local want, seen = {}, {}
        for i = 1, 3 do want[clients[i].localPort] = true end
        for _, a in ipairs(got) do
          assert.are.equal(host, a.address)
          assert.are.equal(host == "::1" and "IPv6" or "IPv4", a.family)
          seen[a.port] = true
        end
        assert.are.same(want, seen)
        for i = 1, 3 do clients[i]:destroy() end
        raw:close()
        assert.is_true(settle())
      end
    end)

    it("a connection its listen callback does not accept is closed, and the server goes on accepting", function()
      local raw = core.tcp_new()
      raw:bind("127.0.0.1", 0)
      local calls = 0
      raw:listen(8, function()
        calls = calls + 1
        if calls > 1 then raw:accept():close() end -- the first is left unaccepted
      end)
      local port = raw:getsockname().port
      local first_closed = false
      local first = net.connect(port, "127.0.0.1")
      first:on("error", function() end)
      first:on("close", function() first_closed = true end)
      first:resume()
      assert.is_true(run_until(function() return first_closed end), "the unaccepted connection stayed open")
      local second_closed = false
      local second = net.connect(port, "127.0.0.1")
      second:on("error", function() end)
      second:on("close", function() second_closed = true end)
      second:resume()
      assert.is_true(run_until(function() return second_closed end), "the server stopped accepting")
      assert.are.equal(2, calls)
      raw:close()
      assert.is_true(settle())
    end)

    it("a connection taken in from a deferred call, whose end is already there, gets 'end' and 'close' once each", function()
      -- its end-of-turn read is queued outside the poll phase, so the poll that follows
      -- reads the end first: the queued read must not read it again
      local loop = require "cluster.loop"
      local raw = core.tcp_new()
      raw:bind("127.0.0.1", 0)
      local stream
      raw:listen(8, function() stream = raw:accept() end)
      local port = raw:getsockname().port
      local events = {}
      -- (half-open: the socket stays open after its end, until it closes its own side)
      local server = net.createServer({ allowHalfOpen = true }, function(sock)
        sock:on("data", function(d) events[#events + 1] = "data:" .. d end)
        sock:on("end", function()
          events[#events + 1] = "end"
          loop.setTimeout(function() sock:close() end, 20)
        end)
        sock:on("close", function() events[#events + 1] = "close" end)
      end)
      server:_setListening({ address = "127.0.0.1", family = "IPv4", port = port })
      local connected = false
      local c = net.connect(port, "127.0.0.1", function() connected = true end)
      assert.is_true(run_until(function() return stream ~= nil and connected end))
      c:destroy()
      run_for(50) -- (the client's end reaches the accepted stream)
      loop.defer(function() server:_acceptStream(stream) end)
      assert.is_true(run_until(function() return events[#events] == "close" end))
      run_for(50)
      assert.are.same({ "end", "close" }, events)
      raw:close()
      close_server(server)
    end)

    it("_adoptHandle listens on a bound handle", function()
      local h = core.tcp_new()
      h:bind("127.0.0.1", 0)
      local server = net.createServer(function(sock) sock:close("adopted") end)
      local listened = false
      server:on("listening", function() listened = true end)
      assert.is_true(server:_adoptHandle(h))
      assert.is_true(run_until(function() return listened end))
      local got = ""
      local c = net.connect(server:address().port, "127.0.0.1")
      c:on("data", function(d) got = got .. d end)
      assert.is_true(run_until(function() return got == "adopted" end))
      c:destroy()
      close_server(server)
    end)

    it("_wrapStream turns a connected handle into a Socket", function()
      local server, port = echo_server()
      local h = core.tcp_new()
      local connected = false
      h:connect("127.0.0.1", port, function(err) assert.is_nil(err) connected = true end)
      assert.is_true(run_until(function() return connected end))
      local sock = net._wrapStream(h)
      assert.are.equal(port, sock.remotePort)
      local got = ""
      sock:on("data", function(d) got = got .. d end)
      sock:write("wrapped")
      assert.is_true(run_until(function() return got == "wrapped" end))
      sock:destroy()
      close_server(server)
    end)
  end)
end)
