-- A turn's writes to a TCP socket (stream.c, "a turn's writes, sent together"): the
-- small writes a socket gets in one turn of the loop leave in one send at the end of
-- the turn, or with the FIN when the socket is closed first; nothing is held while the
-- loop waits, and nothing is lost when the process ends.
local core = require "cluster.core"
local net = require "cluster.net"
local H = require "helper"

local run_until = H.wait_until

local function settle()
  local deadline = core.hrtime() + 2
  while core.alive() and core.hrtime() < deadline do core.poll() end
end

-- A server on 127.0.0.1 whose connections get `on_connection(sock)`; returns it and its port.
local function server_with(on_connection)
  local server = net.createServer(on_connection)
  local ready = false
  server:listen(0, "127.0.0.1", function() ready = true end)
  assert.is_true(run_until(function() return ready end))
  return server, server:address().port
end

local function close_server(server)
  local closed = false
  server:close(function() closed = true end)
  assert.is_true(run_until(function() return closed end))
  settle()
end

-- A client that collects what it reads; returns the client and a table {data=, ended=, closed=}.
local function collecting_client(port, opts)
  local got = { data = "", ended = false, closed = false }
  local c = net.connect(opts or { port = port, host = "127.0.0.1" })
  c:on("data", function(d) got.data = got.data .. d end)
  c:on("end", function() got.ended = true end)
  c:on("close", function() got.closed = true end)
  return c, got
end

-- TCP segments this machine has sent so far (/proc/net/snmp, the Tcp OutSegs column).
local function tcp_out_segments()
  local f = assert(io.open("/proc/net/snmp"))
  local names, values
  for line in f:lines() do
    if line:match("^Tcp: %a") then names = line
    elseif line:match("^Tcp: [%d%-]") then values = line end
  end
  f:close()
  local i, at = 0, nil
  for name in names:gmatch("%S+") do
    if name == "OutSegs" then at = i end
    i = i + 1
  end
  i = 0
  for v in values:gmatch("%S+") do
    if i == at then return tonumber(v) end
    i = i + 1
  end
  error("no OutSegs in /proc/net/snmp")
end

describe("a turn's writes to a TCP socket", function()
  after_each(settle)

  it("reach the peer in the order written, around writes with a callback and writes too large to hold", function()
    local big = string.rep("B", 40 * 1024)
    local called = false
    local server, port = server_with(function(sock)
      sock:write("one,")
      sock:write("two,")
      assert.is_true(sock:write("three,", function(err) called = err == nil end))
      sock:write(big)
      sock:write(",four")
      sock:destroySoon()
    end)
    local c, got = collecting_client(port)
    assert.is_true(run_until(function() return got.closed end, 10000))
    assert.are.equal("one,two,three," .. big .. ",four", got.data)
    assert.is_true(called)
    c:destroy()
    close_server(server)
  end)

  it("written from a timer reach the peer before the loop would next wake (nothing is held while it waits)", function()
    local written_at, received_at, tick_timer
    local later = core.timer()
    local server, port = server_with(function(sock)
      local t = core.timer()
      tick_timer = t
      t:start(20, 0, function()
        -- (nothing else in this turn may keep the loop from waiting: a handle closing,
        -- say, would make its poll return at once)
        sock:write("tick")
        written_at = core.hrtime()
        -- the loop's next due timer is 3 s away: held bytes would wait for it
        later:start(3000, 0, function() end)
      end)
    end)
    local c = net.connect(port, "127.0.0.1")
    c:on("data", function()
      received_at = received_at or core.hrtime()
      core.stop()
    end)
    -- one run of the loop, as cluster.run() does (a run ends with a send of what is
    -- held: run_once would hide a turn that held bytes while the loop waited)
    local guard = core.timer()
    guard:start(5000, 0, function() core.stop() end)
    core.run()
    guard:close()
    assert.is_not_nil(received_at)
    assert.is_true(received_at - written_at < 1, "the bytes waited for the next timer")
    later:close()
    tick_timer:close()
    c:destroy()
    close_server(server)
  end)

  it("go out with the FIN when destroySoon() follows them: answer and end in one segment", function()
    -- each connection: the handshake (3), the answer in pieces with the FIN (1), the
    -- client's ACK and FIN (1 or 2), the server's last ACK (1): 6 or 7 segments, where
    -- sending each piece and then the FIN takes 10 or more
    local N = 40
    local served = 0
    local server, port = server_with(function(sock)
      sock:on("data", function()
        sock:write("HTTP/1.1 200 OK\r\n")
        sock:write("Content-Length: 3\r\n\r\n")
        sock:write("ok\n")
        sock:destroySoon()
        served = served + 1
      end)
    end)
    local before = tcp_out_segments()
    local done = 0
    local function one()
      local c = net.connect(port, "127.0.0.1")
      local data = ""
      c:on("data", function(d) data = data .. d end)
      c:on("close", function()
        assert.are.equal("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", data)
        done = done + 1
        if done < N then one() end
      end)
      c:on("connect", function() c:write("GET / HTTP/1.1\r\n\r\n") end)
    end
    one()
    assert.is_true(run_until(function() return done == N end, 20000))
    local per_connection = (tcp_out_segments() - before) / N
    assert.are.equal(N, served)
    -- (measured: 8 per connection; the bound leaves room for other traffic on the machine)
    assert.is_true(per_connection <= 9.2, ("%.2f segments per connection"):format(per_connection))
    close_server(server)
  end)

  it("that fail at the end of the turn give 'error' (syscall write) then 'close'", function()
    local events, sock = {}, nil
    local server, port = server_with(function(s)
      sock = s
      s:pause() -- (reading would meet the reset first: the write alone is to see it)
      s:on("error", function(err) events[#events + 1] = "error:" .. tostring(err.syscall) end)
      s:on("close", function(had_error) events[#events + 1] = "close:" .. tostring(had_error) end)
      s:write("unread")
    end)
    -- a raw client that never reads: closing it with bytes unread resets the connection
    local raw = core.tcp_new()
    local connected = false
    raw:connect("127.0.0.1", port, function(err) connected = err == nil end)
    assert.is_true(run_until(function() return connected and sock ~= nil end))
    H.wait_until(function() return false end, 50) -- ("unread" reaches the client)
    raw:close()
    H.wait_until(function() return false end, 50) -- (the reset reaches the server)
    sock:write("after the reset") -- (held: the send, and its failure, come at the turn's end)
    assert.is_true(run_until(function() return #events == 2 end))
    assert.are.same({ "error:write", "close:true" }, events)
    close_server(server)
  end)

  for _, how in ipairs { "os.exit(0)", "os.exit(0, true)" } do
    it("written just before " .. how .. " still reach the peer", function()
      local got, ended = "", false
      local server, port = server_with(function(sock)
        sock:on("data", function(d) got = got .. d end)
        sock:on("end", function() ended = true end)
      end)
      local m = H.spawn_master(H.fixture("write_then_exit.lua"), { port, how == "os.exit(0, true)" and "close" or nil })
      assert.is_true(run_until(function() return ended end, 10000))
      assert.are.equal("bye", got)
      assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000))
      assert.are.equal(0, H.master_status(m))
      H.cleanup_master(m)
      close_server(server)
    end)
  end
end)
