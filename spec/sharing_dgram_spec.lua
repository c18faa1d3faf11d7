-- UDP sharing through the master: faithful ports of Node's test-cluster-dgram-1 and
-- test-cluster-dgram-2, with spec/fixtures/dgram_worker.lua as the worker.
--
-- dgram-1: W workers each bind the same fixed port through the master (a plain bind:
-- UDP always shares the master's one bound socket, whatever the scheduling policy).
-- Once the cluster has seen W 'listening' events (addressType "udp4", that port), the
-- master sends W*N numbered datagrams to the port, once each, the next after the
-- previous one's callback, no retries. As in Node, a worker stops at its N-th datagram:
-- it closes its socket inside that 'message' callback (Node's worker exits there), so
-- it reads no more and what is left in the shared socket's queue goes to the others.
-- We check Node's assertion, every worker received exactly N (the master has each
-- count at the worker's 'disconnect'), and more: together they received each numbered
-- datagram once (none lost, none twice). While the workers are bound, this process
-- cannot bind the port alone (EADDRINUSE); every worker disconnects and exits with
-- code 0, and then the master no longer holds the port: a fresh exclusive bind of it
-- in this process succeeds. (Without the stop at N nothing spreads the datagrams: all
-- workers read one socket, whoever reads first takes what is queued, and splits such
-- as 0/0/0/40 happen; so "every worker gets some" holds only because of that stop.)
--
-- dgram-2: the master (this process) binds a UDP socket; W workers each create a udp4
-- socket, bind it explicitly to port 0 through the cluster (the point of Node's test:
-- an implicit bind by send() would bypass the cluster) and send N datagrams to the
-- master's socket without waiting for the bind. We check that the master receives
-- exactly W*N, all from the one shared port; that the binds went through the master
-- (W cluster 'listening' events with addressType "udp4" and that port, every worker
-- reports the same port); and that cluster.disconnect(cb) runs cb, every worker exits
-- with code 0 and the shared port is free again.
--
-- Then two things Node's tests do not cover: a socket closed while its shared bind is
-- still pending (its queued sends are called back with ECANCELED, nothing is sent, the
-- master lets go of the socket it bound), and a shared bind the master could not make
-- (its callback is dropped, as Node's dgram does: a later bind runs only its own).
--
-- The default policy (SCHED_RR) only: UDP does not depend on the policy.
local cluster = require "cluster"
local dgram = require "cluster.dgram"
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"

local W, N = 4, 10           -- Node's NUM_WORKERS and PACKETS_PER_WORKER
local WAIT = 20000           -- generous: the suite also runs under ASan+UBSan

local WORKER = H.fixture("dgram_worker.lua")

-- Waits (up to ms, default WAIT) for a report {ev=ev} from w (see dgram_worker.lua)
-- and removes it from the reports kept by S.fork_script.
local function take(w, ev, ms) return S.take(w, ev, nil, ms or WAIT) end

local function fork(n, env) return S.fork_script(WORKER, n, env) end

-- A UDP port that nothing is bound to right now (on every interface).
local function free_udp_port()
  local h = assert(core.udp_new("udp4"))
  assert(h:bind("0.0.0.0", 0))
  local port = h:getsockname().port
  h:close()
  return port
end

-- Binds a fresh udp4 socket of this process to port (exclusive: not through any
-- master); returns true, or false and the error. The socket is closed by S.close_tracked.
local function bind_here(port, address)
  local s = S.track(dgram.createSocket("udp4"))
  local bound, err = false, nil
  s:on("error", function(e) err = e end)
  s:bind({ port = port, address = address, exclusive = true }, function() bound = true end)
  assert(H.wait_until(function() return bound or err ~= nil end, WAIT), "bind never answered")
  return bound, err
end

describe("sharing, UDP (cluster.dgram)", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
    H.run_for(10)
  end)

  it("dgram-1 (Node test-cluster-dgram-1): W workers bind the same port through the master; of W*N datagrams sent once each worker reads exactly N, none lost or twice; they close, disconnect and exit 0; the port is free again", function()
    local port = free_udp_port()

    -- the cluster sees one 'listening' per worker, for that port, as udp4
    local listening = 0
    cluster.on("listening", H.expect(function(w, address)
      assert.equal("udp4", address.addressType)
      assert.equal(port, address.port)
      assert.equal(w, cluster.workers[w.id])
      listening = listening + 1
    end, W))

    local ws = fork(W, { DGRAM_TEST = "1", DGRAM_PORT = tostring(port), DGRAM_COUNT = tostring(N) })
    -- Node's master: remembers each worker's {received} and checks it on 'disconnect'
    local received, at_disconnect = {}, {}
    for _, w in ipairs(ws) do
      w:on("message", H.expect(function(m)
        if m.ev == "done" then received[w] = m.received end
      end, 2)) -- "bound", "done"
      w:on("disconnect", H.expect(function() at_disconnect[w] = received[w] end, 1))
      w:on("exit", H.expect(nil, 1))
    end
    for _, w in ipairs(ws) do
      local r = take(w, "bound")
      assert(r, "worker " .. w.id .. " never bound")
      assert.equal(port, r.address.port)
    end
    assert.is_true(H.wait_until(function() return listening == W end, WAIT))
    -- the port is held (by the master's one socket): this process cannot bind it alone
    local held, held_err = bind_here(port)
    assert.is_false(held)
    assert.equal("EADDRINUSE", held_err.code)

    -- the master sends W*N datagrams, each once, the next after the previous one's
    -- callback (Node's doSend/afterSend), then closes its socket
    local sender = S.track(dgram.createSocket("udp4"))
    local sent, send_errors, sender_closed = 0, {}, false
    local function do_send()
      sender:send("hello world " .. (sent + 1), port, "127.0.0.1", function(err)
        if err then send_errors[#send_errors + 1] = tostring(err) end
        sent = sent + 1
        if sent < W * N then do_send() else sender:close(function() sender_closed = true end) end
      end)
    end
    do_send()
    assert.is_true(H.wait_until(function() return sender_closed end, WAIT), "the master's sends never completed")
    assert.same({}, send_errors)

    -- Each worker stops reading at its N-th datagram and the rest stay in the one
    -- shared socket's queue for the others, so each worker gets exactly N (Node's
    -- assertion), and together they got every datagram once: none lost, none twice.
    local seen, reports = {}, {}
    for _, w in ipairs(ws) do
      local r = take(w, "done")
      if not r then
        local counts = {}
        for _, v in ipairs(ws) do
          reports[v] = reports[v] or take(v, "done", 0)
          counts[#counts + 1] = reports[v] and tostring(reports[v].received) or "-"
        end
        error(("worker %d never received %d datagrams (workers done: %s)"):format(w.id, N, table.concat(counts, " ")))
      end
      reports[w] = r
      assert.equal(N, r.received)
      assert.equal(N, #r.data)
      for _, d in ipairs(r.data) do
        local i = math.tointeger(tonumber(d:match("^hello world (%d+)$")))
        assert(i and i >= 1 and i <= W * N, "unexpected payload " .. d)
        assert.is_nil(seen[i], "datagram " .. i .. " received twice")
        seen[i] = w.id
      end
    end
    for i = 1, W * N do assert.is_not_nil(seen[i], "datagram " .. i .. " lost") end
    for _, w in ipairs(ws) do assert.is_nil(take(w, "error", 0)) end

    -- every worker (its socket closed) disconnects and exits 0; at its 'disconnect'
    -- the master had its count, N
    for _, w in ipairs(ws) do
      local code, signal = S.wait_exit(w, WAIT)
      assert.equal(0, code)
      assert.is_nil(signal)
      assert.is_true(w.exitedAfterDisconnect)
      assert.equal(N, at_disconnect[w])
    end

    -- the master let go of the port: this process can bind it alone
    local ok, err = bind_here(port)
    assert.is_true(ok, tostring(err))
    H.finish(WAIT)
  end)

  it("dgram-2 (Node test-cluster-dgram-2): W workers bind(0) through the master and send N datagrams each to the master's socket; all W*N arrive from the one shared port; cluster.disconnect(cb) runs cb and every worker exits 0", function()
    -- the master's socket, on every interface as in Node
    local received, from_ports = 0, {}
    local master_socket = S.track(dgram.createSocket("udp4", function(data, rinfo)
      assert.equal("hello world", data)
      received = received + 1
      from_ports[rinfo.port] = (from_ports[rinfo.port] or 0) + 1
    end))
    local bound = false
    master_socket:bind(0, function() bound = true end)
    assert.is_true(H.wait_until(function() return bound end, WAIT))
    local port = master_socket:address().port

    -- the workers' binds go through the master: one cluster 'listening' each, udp4
    local heard = {}
    cluster.on("listening", H.expect(function(w, address)
      assert.equal("udp4", address.addressType)
      heard[#heard + 1] = { worker = w, port = address.port }
    end, W))

    local ws = fork(W, { DGRAM_TEST = "2", DGRAM_PORT = tostring(port), DGRAM_COUNT = tostring(N) })
    for _, w in ipairs(ws) do
      w:on("disconnect", H.expect(nil, 1))
      w:on("exit", H.expect(nil, 1))
    end

    -- every worker bound the same port (the master's one socket) and sent N datagrams
    local shared_port
    for _, w in ipairs(ws) do
      local r = take(w, "bound")
      assert(r, "worker " .. w.id .. " never bound")
      assert.is_true(r.address.port > 0)
      shared_port = shared_port or r.address.port
      assert.equal(shared_port, r.address.port)
      local s = take(w, "sent")
      assert(s, "worker " .. w.id .. " never finished sending")
      assert.equal(N, s.n)
      assert.same({}, s.errors)
    end
    assert.is_true(H.wait_until(function() return #heard == W end, WAIT))
    local who = {}
    for _, h in ipairs(heard) do
      assert.equal(shared_port, h.port)
      who[h.worker] = true
    end
    for _, w in ipairs(ws) do assert.is_true(who[w], "no 'listening' for worker " .. w.id) end
    for _, w in ipairs(ws) do assert.is_nil(take(w, "error", 0)) end

    -- the master receives exactly W*N, all sent from the shared socket
    assert.is_true(H.wait_until(function() return received >= W * N end, WAIT),
      ("the master received %d of %d datagrams"):format(received, W * N))
    H.run_for(300)
    assert.equal(W * N, received)
    assert.same({ [shared_port] = W * N }, from_ports)

    -- Node: close the socket and disconnect every worker
    S.close_local(master_socket)
    local done = false
    cluster.disconnect(H.expect(function() done = true end, 1))
    assert.is_true(H.wait_until(function() return done end, WAIT), "cluster.disconnect's callback never ran")
    for _, w in ipairs(ws) do
      local code, signal = S.wait_exit(w, WAIT)
      assert.equal(0, code)
      assert.is_nil(signal)
      assert.is_true(w.exitedAfterDisconnect)
    end

    -- the master holds no shared socket any more: the shared port is free
    local ok, err = bind_here(shared_port)
    assert.is_true(ok, tostring(err))
    H.finish(WAIT)
  end)

  it("a worker's socket closed while its shared bind is pending: each queued send is called back with ECANCELED before 'close', none is sent, no 'listening' reaches the cluster and the master closes the socket it bound", function()
    -- where the sends would go: a socket of this process that counts what arrives
    local arrived = 0
    local target = S.track(dgram.createSocket("udp4", function() arrived = arrived + 1 end))
    local bound = false
    target:bind(0, "127.0.0.1", function() bound = true end)
    assert.is_true(H.wait_until(function() return bound end, WAIT))
    local port = target:address().port
    cluster.on("listening", H.expect(nil, 0))
    local fds_before = S.settled_fd_count(core.getpid())

    local w = fork(1, { DGRAM_TEST = "3", DGRAM_PORT = tostring(port), DGRAM_COUNT = "3" })[1]
    w:on("exit", H.expect(nil, 1))
    local r = take(w, "cancelled")
    assert(r, "the worker's socket never closed")
    local cancelled = "send ECANCELED 127.0.0.1:" .. port
    assert.same({ cancelled, cancelled, cancelled, "close" }, r.events)
    assert.is_nil(take(w, "bound", 0))
    assert.is_nil(take(w, "error", 0))

    w:disconnect()
    local code = S.wait_exit(w, WAIT)
    assert.equal(0, code)
    H.run_for(100)
    assert.equal(0, arrived)
    -- the master closed the socket it bound for the worker (and the channel is gone)
    assert.equal(fds_before, S.settled_fd_count(core.getpid()))
    H.finish(WAIT)
  end)

  it("a worker with no file descriptor left gets EMFILE on its bind (the master's socket could not arrive) and keeps its channel; once descriptors are free the same bind succeeds and receives", function()
    local w = S.fork(1)[1]
    local restore = S.starve(w.process.pid)
    if not restore then pending("no prlimit(1)") return end
    local ok, r = pcall(function()
      w:send({ cmd = "bind", tag = "u", port = 0, address = "127.0.0.1" })
      return S.take(w, "error", "u", WAIT)
    end)
    restore()
    assert(ok, r)
    assert.is_table(r, "no error came")
    assert.equal("EMFILE", r.code)
    assert.equal("bind", r.syscall)
    assert.matches("bind EMFILE 127.0.0.1:0 (the master's socket did not arrive", r.message, 1, true)
    assert.is_true(w:isConnected())
    w:send({ cmd = "bind", tag = "v", port = 0, address = "127.0.0.1" })
    local bound = assert(S.take(w, "bound", "v", WAIT))
    assert.equal(w.process.pid, S.udp_ask(bound.address.port))
  end)

  it("a worker's bind the master could not make drops its callback: the worker's next bind runs only its own, as in Node", function()
    local port = free_udp_port()
    local held, held_err = bind_here(port) -- this process holds the port: the master's bind fails
    assert.is_true(held, tostring(held_err))
    local w = fork(1, { DGRAM_TEST = "4", DGRAM_PORT = tostring(port) })[1]
    w:on("exit", H.expect(nil, 1))
    local r = take(w, "rebound")
    assert(r, "the worker never bound again")
    assert.same({ "error EADDRINUSE", "callback second" }, r.events)
    w:disconnect()
    assert.equal(0, (S.wait_exit(w, WAIT)))
    H.finish(WAIT)
  end)
end)
