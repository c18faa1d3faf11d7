-- Handles passed with messages in both directions: ports of Node's
-- test/parallel/test-cluster-send-deadlock.js and test-cluster-send-handle-twice.js
-- (worker side: spec/fixtures/send_worker.lua; this process is the master).
--
-- send-deadlock: the master runs a server; the worker connects to it twice; the master
-- sends each accepted socket to the worker (worker:send("handle", socket)) and the
-- worker sends every socket it gets straight back (cluster.worker:send("reply",
-- socket)), so handle messages cross the channel master->worker and worker->master at
-- the same time. Checked: no deadlock: each client reads the answer the master writes
-- on the socket that came back (its own connection: the client's local port), and
-- closes once the worker ended it; each socket went out and came back exactly once; the
-- master's copies of the sent sockets close; the worker disconnects and exits with code
-- 0 and no signal; then the server closes (Node closes it in 'exit'). Also run with 100
-- connections at once, so that many handle messages are in flight both ways.
--
-- send-handle-twice: the worker's server (shared through the master) sends the socket
-- it accepted to the master twice. Checked: no crash; both arrive as working sockets of
-- the same connection (the master writes on each and the worker's client reads both
-- answers); the client closes; the worker accepted exactly one connection, disconnects
-- and exits with code 0 and no signal.
local cluster = require "cluster"
local net = require "cluster.net"
local H = require "helper"
local S = require "fixtures.share_lib"

local WORKER = H.fixture("send_worker.lua")
-- generous: the suite also runs under ASan+UBSan on a loaded machine
local WAIT = 20000

local function fork(mode, env)
  env = env or {}
  env.SEND_MODE = mode
  local w = S.fork_script(WORKER, 1, env)[1]
  w:on("exit", H.expect(function() end, 1, "worker 'exit'"))
  return w
end

local function is_socket(obj) return getmetatable(obj) == net.Socket end

-- Node's test-cluster-send-deadlock with n client connections (Node: 2).
local function send_deadlock(n)
  local w = fork("deadlock")
  local accepted, replies, report, errs = {}, {}, nil, {}
  local server
  -- the master's half: the server, which sends each accepted socket to the worker
  server = S.track(net.createServer(function(socket)
    accepted[#accepted + 1] = socket
    socket:on("error", function(e) errs[#errs + 1] = "accepted: " .. tostring(e) end)
    w:send("handle", socket)
  end))
  server:on("error", function(e) errs[#errs + 1] = "server: " .. tostring(e) end)
  w:on("message", function(msg, handle)
    if msg == "reply" then
      replies[#replies + 1] = handle
      if is_socket(handle) then
        -- the socket is back: answer on it, with which connection it is (the client's
        -- port); it ends once the client has ended (the 50 ms timer in the worker)
        handle:on("error", function(e) errs[#errs + 1] = "reply: " .. tostring(e) end)
        handle:write(tostring(handle.remotePort) .. "\n")
      end
    elseif type(msg) == "table" and msg.ev == "clients" then
      report = msg
    end
  end)
  local server_closed = false
  w:on("exit", function() server:close(function() server_closed = true end) end)
  server:listen(0, function()
    w:send({ message = "listen", port = server:address().port, clients = n })
  end)

  local code, signal = S.wait_exit(w, WAIT)
  assert.equal(0, code)
  assert.is_nil(signal)
  assert.is_true(w.exitedAfterDisconnect)
  assert.is_true(H.wait_until(function() return server_closed end, WAIT), "the server never closed")
  assert.same({}, errs)

  -- every client got its answer, on its own connection, and closed
  assert.is_table(report, "the worker never reported its clients")
  assert.equal(n, #report.clients)
  for i, r in ipairs(report.clients) do
    assert.is_nil(r.err, "client " .. i)
    assert.is_number(r.port, "client " .. i .. " never connected")
    assert.equal(r.port .. "\n", r.data, "client " .. i)
  end
  -- each socket went to the worker and came back once: master->worker, worker->master
  assert.equal(n, #accepted)
  assert.equal(n, #replies)
  for i, s in ipairs(replies) do assert.is_true(is_socket(s), "reply " .. i .. " without a socket") end
  assert.equal(n + 1, report.messages)   -- "listen" and one "handle" per connection (Node's mustCall(3))
  assert.equal(n, report.handles)
  -- the sender's copy closes once sent; the copy that came back ends with its client
  assert.is_true(H.wait_until(function()
    for _, s in ipairs(accepted) do if not s.destroyed then return false end end
    for _, s in ipairs(replies) do if not s.destroyed then return false end end
    return true
  end, WAIT), "a socket stayed open")
  H.finish(WAIT)
end

describe("sharing, handles sent both ways", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  it("send-deadlock (Node test-cluster-send-deadlock): the master sends 2 accepted sockets to the worker while the worker sends them back; every client is answered on its own connection and closes; the worker exits 0, no signal", function()
    send_deadlock(2)
  end)

  it("send-deadlock (Node test-cluster-send-deadlock): the same with 100 connections at once, many handle messages in flight both ways", function()
    send_deadlock(100)
  end)

  it("send-handle-twice (Node test-cluster-send-handle-twice): a worker sends the socket it accepted to the master twice; no crash, both copies work, the client closes; the worker exits 0, no signal", function()
    local w = fork("twice")
    local got, report, errs = {}, nil, {}
    local first
    w:on("message", function(msg, handle)
      if msg == "send-handle-1" or msg == "send-handle-2" then
        got[#got + 1] = { msg, handle }
        if not is_socket(handle) then return end
        handle:on("error", function(e) errs[#errs + 1] = msg .. ": " .. tostring(e) end)
        -- both copies are the same connection: each answers with its message. The
        -- first waits (paused) for the second: read first, the client's end would end
        -- the connection before the second could write.
        handle:write(msg .. "\n")
        if msg == "send-handle-1" then
          first = handle
          handle:pause()
        elseif first then
          first:resume()
        end
      elseif type(msg) == "table" and msg.ev == "client" then
        report = msg
      elseif type(msg) == "table" and msg.ev == "error" then
        errs[#errs + 1] = "listen: " .. tostring(msg.message)
      end
    end)

    local code, signal = S.wait_exit(w, WAIT)
    assert.equal(0, code)
    assert.is_nil(signal)
    assert.is_true(w.exitedAfterDisconnect)
    assert.same({}, errs)
    assert.equal(2, #got)
    assert.equal("send-handle-1", got[1][1])
    assert.equal("send-handle-2", got[2][1])
    for i, g in ipairs(got) do assert.is_true(is_socket(g[2]), "copy " .. i .. " is not a socket") end
    assert.is_table(report, "the worker's client never closed")
    assert.is_nil(report.err)
    assert.equal(1, report.connections)
    assert.equal("send-handle-1\nsend-handle-2\n", report.data)
    -- both copies end with the client
    assert.is_true(H.wait_until(function() return got[1][2].destroyed and got[2][2].destroyed end, WAIT),
      "a copy stayed open")
    H.finish(WAIT)
  end)
end)

describe("a sent socket's copy in the sender", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  -- A stream closed in the poll phase it was made in skips libuv's EPOLL_CTL_DEL (it was
  -- never added: csrc/util.c). One that lived longer must still be taken out of epoll:
  -- the file lives on in the receiver, and the kernel drops a watch only with the file.
  it("once polled, leaves the sender's epoll set when it closes, though the receiver still holds the connection", function()
    local w = fork("polled")
    local port = assert(S.take(w, "port", nil, WAIT), "the worker never listened").port
    local received
    w:on("message", function(msg, handle) if msg == "polled" then received = handle end end)
    local client = S.track(net.connect(port, "127.0.0.1"))
    client:on("error", function() end)
    local after = assert(S.take(w, "after", nil, WAIT), "the worker's copy never closed")
    assert.is_true(after.before, "the connection was not in the worker's epoll set while it read")
    assert.is_false(after.after, "the worker's epoll set still holds the connection after its copy closed")
    assert.is_true(H.wait_until(function() return received ~= nil end, WAIT))
    assert.is_true(is_socket(received))
    assert.is_false(received.destroyed)
    received:destroy()
    client:destroy()
    assert.equal(0, (S.wait_exit(w, WAIT)))
    H.finish(WAIT)
  end)

  -- A connection that this process alone holds skips libuv's DEL too (csrc/util.c): the
  -- kernel drops a file's watches when its last descriptor closes.
  it("one the worker alone held, once polled, is out of the worker's epoll set after it closes", function()
    local w = fork("polled", { SEND_POLLED_KEEP = "1" })
    local port = assert(S.take(w, "port", nil, WAIT), "the worker never listened").port
    local client = S.track(net.connect(port, "127.0.0.1"))
    local ended = false
    client:on("error", function() end)
    client:on("close", function() ended = true end)
    local after = assert(S.take(w, "after", nil, WAIT), "the worker's connection never closed")
    assert.is_true(after.before, "the connection was not in the worker's epoll set while it read")
    assert.is_false(after.after, "the worker's epoll set still holds the connection after it closed")
    assert.is_true(H.wait_until(function() return ended end, WAIT), "the client never saw the close")
    assert.equal(0, (S.wait_exit(w, WAIT)))
    H.finish(WAIT)
  end)
end)

describe("what follows a handle on a channel that is closing", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  -- recvmsg stops after a message that carries descriptors, and libuv (up to
  -- libuv/libuv#4992) takes such a short read on a hung-up socket for its end: the
  -- master lost the frames after the handle about one time in four
  it("a message a worker sends right after a handle, then disconnecting, reaches the master, and so does its disconnect (20 workers)", function()
    local workers = S.fork_script(WORKER, 20, { SEND_MODE = "handle_then_leave" })
    local got = {}
    for _, w in ipairs(workers) do
      got[w] = {}
      w:on("message", function(msg, handle)
        if msg == "server" then
          got[w][#got[w] + 1] = getmetatable(handle) == net.Server and "server" or "not a server"
          if handle then handle:close() end
        elseif type(msg) == "table" and msg.ev then
          got[w][#got[w] + 1] = msg.ev
        end
      end)
    end
    for _, w in ipairs(workers) do
      local code, signal = S.wait_exit(w, WAIT)
      assert.same({ 0, nil }, { code, signal })
      assert.same({ "server", "after-handle" }, got[w], "worker " .. w.id)
      assert.is_true(w.exitedAfterDisconnect, "worker " .. w.id .. ": its disconnect was lost")
    end
    H.finish(WAIT)
  end)
end)

describe("send callbacks with handles", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  -- A frame with a handle goes out as a write request, called back on a later turn; a
  -- plain frame after it may be written at once: its callback still waits its turn.
  for _, where in ipairs({ "the main chunk", "a deferred call", "a timer", "a message listener" }) do
    it("run in the order of the sends: a send with a handle, then a plain send, from " .. where, function()
      local w = S.fork(1)[1]
      local server = S.local_server(0, "127.0.0.1")
      local order = {}
      local function sends()
        w:send({ tag = "first" }, server, function(err) order[#order + 1] = "handle " .. tostring(err) end)
        w:send({ tag = "second" }, function(err) order[#order + 1] = "plain " .. tostring(err) end)
        w:send({ tag = "third" }, function(err) order[#order + 1] = "plain2 " .. tostring(err) end)
      end
      if where == "the main chunk" then
        sends()
      elseif where == "a deferred call" then
        cluster.defer(sends)
      elseif where == "a timer" then
        cluster.setTimeout(sends, 1)
      else
        w:once("message", sends)
        w:send({ cmd = "chdir", dir = "/" }) -- answered with a report
      end
      assert.is_true(H.wait_until(function() return #order == 3 end, WAIT))
      assert.same({ "handle nil", "plain nil", "plain2 nil" }, order)
      assert(S.take(w, "got"))
    end)
  end
end)
