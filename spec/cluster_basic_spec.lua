-- The life of a worker as the master sees it: fork, ids, the workers table, event order,
-- states and flags. Node's test-cluster-basic, -worker-events, -worker-init, -worker-isdead,
-- -worker-isconnected, minus what needs sockets ('listening').
local cluster = require "cluster"
local H = require "helper"

describe("cluster lifecycle", function()
  before_each(function()
    H.setup()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
  end)
  after_each(H.teardown)

  it("is the master in the process that was not forked", function()
    assert.is_true(cluster.isMaster)
    assert.is_true(cluster.isPrimary)
    assert.is_false(cluster.isWorker)
    assert.is_nil(cluster.worker)
  end)

  it("gives ids that start at 1, grow by one and are never reused", function()
    local first = cluster.fork({ FIXTURE_MODE = "exit" })
    assert.equal(1, first.id)
    assert.equal(math.type(first.id), "integer")
    assert.is_true(H.wait_until(function() return first:isDead() and cluster.workers[1] == nil end, 5000))
    local ids = {}
    for i = 1, 3 do ids[i] = cluster.fork({ FIXTURE_MODE = "exit" }).id end
    assert.same({ 2, 3, 4 }, ids)
    H.finish()
  end)

  it("'fork' never fires inside fork(), and cluster.workers[id] is set before fork() returns", function()
    local fired = false
    cluster.on("fork", H.expect(function(w)
      fired = true
      assert.equal(cluster.workers[w.id], w)
    end))
    local w = cluster.fork()
    assert.is_false(fired)
    assert.equal(w, cluster.workers[w.id])
    assert.is_true(H.wait_until(function() return fired end, 5000))
    w:kill()
    H.finish()
  end)

  it("gives a worker forked from an 'exit' listener (a respawn) a new id", function()
    local first = cluster.fork({ FIXTURE_MODE = "exit" })
    local second
    first:on("exit", function() second = cluster.fork() end)
    assert.is_true(H.wait_until(function() return second ~= nil end, 5000))
    assert.equal(first.id + 1, second.id)
    assert.equal(second, cluster.workers[second.id])
    assert.is_true(H.wait_until(function() return cluster.workers[first.id] == nil end, 5000))
    second:kill()
    H.finish()
  end)

  it("emits fork < online < {disconnect, exit} for each worker, on the worker and on cluster", function()
    local seen = {}
    local function record(name) return function(w) seen[#seen + 1] = name end end
    for _, name in ipairs { "fork", "online", "disconnect", "exit" } do
      cluster.on(name, H.expect(record("cluster:" .. name)))
    end
    local w = cluster.fork({ FIXTURE_MODE = "exit", FIXTURE_CODE = "0" })
    for _, name in ipairs { "online", "disconnect", "exit" } do
      w:on(name, H.expect(record("worker:" .. name)))
    end
    assert.is_true(H.wait_until(function() return #seen == 7 end, 5000))
    assert.equal("cluster:fork", seen[1])
    assert.equal("worker:online", seen[2])
    assert.equal("cluster:online", seen[3])
    local rest = {}
    for i = 4, 7 do rest[seen[i]] = i end
    assert.is_not_nil(rest["worker:disconnect"])
    assert.is_not_nil(rest["worker:exit"])
    assert.is_true(rest["worker:disconnect"] < rest["cluster:disconnect"])
    assert.is_true(rest["worker:exit"] < rest["cluster:exit"])
    H.finish()
  end)

  it("emits 'exit' after everything the worker wrote before it died: its 'online' and messages come first, then 'disconnect'", function()
    -- The worker's process is a shell that exits at once, leaving its channel to a
    -- background lua5.4 that loads cluster (which sends 'online') 200 ms later.
    local master = require "cluster.master"
    local drain = master.EXIT_DRAIN_MS
    master.EXIT_DRAIN_MS = 10000
    local lua = require("cluster.core").exepath()
    cluster.setupMaster { execPath = "/bin/sh", execArgv = { "-c",
      H.shell_quote(lua) .. [[ -e "os.execute('sleep 0.2')" "$0" "$1" "$2" & exit 0]] },
      exec = H.fixture("life_late_online.lua") }
    local w = cluster.fork()
    cluster.setupMaster { execPath = lua, execArgv = {} }
    local seen = {}
    for _, name in ipairs { "online", "message", "disconnect", "exit" } do
      w:on(name, function() seen[#seen + 1] = name .. ":" .. w.state end)
    end
    local ok = H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000)
    master.EXIT_DRAIN_MS = drain
    assert.is_true(ok)
    assert.same({ "online:online", "message:online", "disconnect:disconnected", "exit:dead" }, seen)
    H.finish()
  end)

  it("in a worker, each of the master's functions raises an error that names it", function()
    cluster.setupMaster { exec = H.fixture("life_master_only.lua") }
    local w = cluster.fork()
    local raised
    w:on("message", H.expect(function(m) raised = m end))
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    for _, name in ipairs { "fork", "autoFork", "setupMaster", "setupPrimary", "disconnect" } do
      assert.equal("string", type(raised[name]), name)
      assert.equal(name .. ": ", raised[name]:match("^[%w]+: "), raised[name])
    end
    assert.truthy(raised.fork:find("only the master forks", 1, true))
    assert.truthy(raised.disconnect:find("cluster.worker:disconnect()", 1, true))
    H.finish()
  end)

  it("runs a worker's own listeners before the cluster's for the same event", function()
    local order = {}
    -- the cluster listeners are added first: the worker's still run first
    for _, name in ipairs { "online", "message", "disconnect", "exit" } do
      cluster.on(name, function() order[#order + 1] = "cluster:" .. name end)
    end
    local w = cluster.fork()
    for _, name in ipairs { "online", "message", "disconnect", "exit" } do
      w:on(name, function() order[#order + 1] = "worker:" .. name end)
    end
    w:on("online", function() w:send("ping") end)
    w:on("message", function() w:kill() end)
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    local pos = {}
    for i, e in ipairs(order) do pos[e] = i end
    for _, name in ipairs { "online", "message", "disconnect", "exit" } do
      assert.is_not_nil(pos["worker:" .. name], name)
      assert.is_true(pos["worker:" .. name] < pos["cluster:" .. name], name)
    end
    H.finish()
  end)

  it("keeps a worker in cluster.workers until it is both disconnected and dead, and removes it before the later event", function()
    local w = cluster.fork({ FIXTURE_MODE = "exit", FIXTURE_CODE = "3" })
    local events = 0
    local function check()
      events = events + 1
      if events == 1 then
        assert.equal(w, cluster.workers[w.id])
      else
        assert.is_nil(cluster.workers[w.id])
      end
    end
    w:on("disconnect", H.expect(check))
    w:on("exit", H.expect(check))
    assert.is_true(H.wait_until(function() return events == 2 end, 5000))
    assert.is_nil(cluster.workers[w.id])
    H.finish()
  end)

  it("removes a worker from cluster.workers at once when the master calls worker:disconnect()", function()
    local w = cluster.fork()
    w:on("online", H.expect(function()
      w:disconnect()
      assert.is_nil(cluster.workers[w.id])
    end))
    w:on("disconnect", H.expect(function() assert.is_nil(cluster.workers[w.id]) end))
    w:on("exit", H.expect(function() assert.is_nil(cluster.workers[w.id]) end))
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    H.finish()
  end)

  it("leaves exitedAfterDisconnect nil while the worker is alive, then a boolean (alias suicide)", function()
    local w = cluster.fork()
    assert.is_nil(w.exitedAfterDisconnect)
    assert.is_nil(w.suicide)
    w:on("online", H.expect(function()
      assert.is_nil(w.exitedAfterDisconnect)
      w:send({ cmd = "exit", code = 0 })
    end))
    local flags = {}
    w:on("disconnect", H.expect(function() flags.disconnect = w.exitedAfterDisconnect end))
    w:on("exit", H.expect(function() flags.exit = w.exitedAfterDisconnect end))
    assert.is_true(H.wait_until(function() return flags.exit ~= nil and flags.disconnect ~= nil end, 5000))
    assert.is_false(flags.exit)
    assert.is_false(flags.disconnect)
    assert.is_false(w.exitedAfterDisconnect)
    assert.is_false(w.suicide)
    H.finish()
  end)

  it("keeps the v0.6 names: event 'death', destroy, uniqueID, suicide, autoFork", function()
    local w = cluster.fork()
    assert.equal(w.kill, w.destroy)
    assert.equal(w.id, w.uniqueID)
    local deaths = 0
    cluster.on("death", function(dead)
      if dead == w then deaths = deaths + 1 end
    end)
    w:on("death", H.expect())
    w:on("online", H.expect(function() w:destroy() end))
    assert.is_true(H.wait_until(function() return deaths == 1 end, 5000))
    assert.equal(false, w.suicide)
    assert.equal(w.exitedAfterDisconnect, w.suicide)

    local forked = cluster.autoFork()
    assert.equal(cluster.cpus(), #forked)
    assert.is_true(cluster.cpus() >= 1)
    for _, f in ipairs(forked) do
      assert.equal(f, cluster.workers[f.id])
      f:kill()
    end
    H.finish()
  end)

  it("isDead/isConnected: alive and connected after fork, disconnected on 'disconnect', dead on 'exit'", function()
    local w = cluster.fork()
    assert.is_false(w:isDead())
    assert.is_true(w:isConnected())
    w:on("online", H.expect(function()
      assert.is_false(w:isDead())
      assert.is_true(w:isConnected())
      w:kill("SIGKILL")
    end))
    w:on("disconnect", H.expect(function() assert.is_false(w:isConnected()) end))
    w:on("exit", H.expect(function() assert.is_true(w:isDead()) end))
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    H.finish()
  end)

  it("basic (Node test-cluster-basic): events carry the worker, states go none > online > dead, 'exit' gets (code, signal)", function()
    local worker
    local states = {}
    for _, name in ipairs { "fork", "online", "exit" } do
      cluster.on(name, H.expect(function(w, ...)
        assert.equal(worker, w)
        states[name] = w.state
      end))
    end
    worker = cluster.fork()
    assert.equal(1 <= worker.id, true)
    assert.equal(getmetatable(worker), getmetatable(cluster.workers[worker.id]))
    assert.equal("none", worker.state)
    worker:on("online", H.expect(function(...)
      assert.equal(0, select("#", ...))
      worker:kill()
    end))
    worker:on("exit", H.expect(function(...)
      assert.equal(2, select("#", ...))
      local code, signal = ...
      assert.is_nil(code)
      assert.equal("SIGTERM", signal)
    end))
    assert.is_true(H.wait_until(function() return states.exit ~= nil end, 5000))
    assert.equal("none", states.fork)
    assert.equal("online", states.online)
    assert.equal("dead", states.exit)
    H.finish()
  end)

  it("worker-events (Node test-cluster-worker-events): a message sent to a worker reaches cluster.worker's listeners and its exit code comes back", function()
    local w = cluster.fork()
    assert.is_true(w:send("SOME MESSAGE"))
    w:on("message", H.expect(function(m)
      assert.equal("SOME MESSAGE", m)
      w:send({ cmd = "exit", code = 2 })
    end))
    local code
    w:on("exit", H.expect(function(c) code = c end))
    assert.is_true(H.wait_until(function() return code ~= nil end, 5000))
    assert.equal(2, code)
    H.finish()
  end)

  it("worker-init (Node test-cluster-worker-init): cluster.worker receives messages as soon as it is online, and disconnect() returns the worker", function()
    local w = cluster.fork()
    w:on("online", function() w:send("foo") end)
    w:on("message", H.expect(function(m)
      assert.equal("foo", m)
      assert.equal(w, w:disconnect())
    end))
    assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    H.finish()
  end)

  it("worker-isdead (Node test-cluster-worker-isdead): isDead is false after fork and in the worker, true on 'exit'", function()
    local w = cluster.fork({ FIXTURE_MODE = "info" })
    assert.is_false(w:isDead())
    w:on("message", H.expect(function(m)
      assert.is_true(m.isWorker)
      assert.is_false(m.isDead)        -- as seen from inside the worker
      w:kill()
    end))
    w:on("exit", H.expect(function() assert.is_true(w:isDead()) end))
    assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    H.finish()
  end)

  it("worker-isconnected (Node test-cluster-worker-isconnected): connected at once, not after 'disconnect', on both sides", function()
    local w = cluster.fork({ FIXTURE_MODE = "check_isconnected" })
    assert.is_true(w:isConnected())
    local code
    w:on("exit", function(c) code = c end)
    w:on("online", function() w:send("readyToDisconnect") end)
    w:on("message", H.expect(function() w:disconnect() end))
    w:on("disconnect", H.expect(function() assert.is_false(w:isConnected()) end))
    assert.is_true(H.wait_until(function() return w:isDead() end, 5000))
    assert.equal(0, code)   -- 3 would mean isConnected() was true in the worker's 'disconnect'
    H.finish()
  end)
end)
