-- Events on cluster and on workers (Node's EventEmitter semantics): order, once, off,
-- chaining, changes while an event is being emitted, argument errors.
local cluster = require "cluster"
local Emitter = require "cluster.emitter"
local H = require "helper"

describe("cluster events", function()
  before_each(H.setup)
  after_each(H.teardown)

  it("calls listeners in the order they were added, with the event's arguments", function()
    local e = Emitter.new()
    local calls = {}
    e:on("x", function(...) calls[#calls + 1] = { "first", ... } end)
    e:on("x", function(...) calls[#calls + 1] = { "second", ... } end)
    assert.is_true(e:emit("x", 1, nil, "three"))
    assert.is_false(e:emit("nobody-listens"))
    assert.same({ { "first", 1, nil, "three" }, { "second", 1, nil, "three" } }, calls)
    H.finish()
  end)

  it("on returns the emitter so calls chain, with a dot on cluster and a colon on workers", function()
    local n = 0
    local f = function() n = n + 1 end
    assert.equal(cluster, cluster.on("spec-a", f).on("spec-b", f))
    assert.equal(cluster, cluster:on("spec-c", f))
    cluster.emit("spec-a")
    cluster:emit("spec-b")
    cluster.emit("spec-c")
    assert.equal(3, n)
    assert.equal(1, cluster.listenerCount("spec-a"))
    cluster.off("spec-a", f)
    assert.equal(0, cluster.listenerCount("spec-a"))
    H.finish()
  end)

  it("once runs a listener one time, and off removes it by the function given to once", function()
    local e = Emitter.new()
    local n, m = 0, 0
    e:once("x", function() n = n + 1 end)
    e:emit("x")
    e:emit("x")
    assert.equal(1, n)
    local f = function() m = m + 1 end
    e:once("y", f)
    assert.equal(1, e:listenerCount("y"))
    e:off("y", f)
    assert.equal(0, e:listenerCount("y"))
    e:emit("y")
    assert.equal(0, m)
    H.finish()
  end)

  it("a listener added during an emit runs from the next emit; one removed during an emit still runs in that emit", function()
    local e = Emitter.new()
    local calls = {}
    local late = function() calls[#calls + 1] = "late" end
    local b = function() calls[#calls + 1] = "b" end
    e:on("x", function()
      calls[#calls + 1] = "a"
      if #calls == 1 then
        e:on("x", late)
        e:off("x", b)
      end
    end)
    e:on("x", b)
    e:emit("x")
    e:emit("x")
    assert.same({ "a", "b", "a", "late" }, calls)
    H.finish()
  end)

  it("off with no function removes every listener of the event; removeAllListeners removes all", function()
    local e = Emitter.new()
    local f = function() error("must not run") end
    e:on("x", f):on("x", f):on("y", f)
    e:off("x")
    assert.equal(0, e:listenerCount("x"))
    assert.equal(1, e:listenerCount("y"))
    e:removeAllListeners()
    assert.equal(0, e:listenerCount("y"))
    e:emit("x")
    e:emit("y")
    H.finish()
  end)

  it("removeAllListeners() tells the emitter's remove hook of every event it empties, as off does", function()
    local e = Emitter.new()
    local removed = {}
    e._onRemoveListener = function(_, name) removed[#removed + 1] = name end
    e:on("x", print):on("x", print):on("y", print)
    e:removeAllListeners()
    table.sort(removed)
    assert.same({ "x", "y" }, removed)
    assert.equal(0, e:listenerCount("x") + e:listenerCount("y"))
    e:removeAllListeners() -- nothing left: nothing to tell
    assert.equal(2, #removed)
    e:on("z", print) -- still an emitter
    assert.equal(1, e:listenerCount("z"))
    H.finish()
  end)

  it("signals as events: an unknown SIG name is a plain event (as Node); a signal that cannot be watched raises and keeps no listener", function()
    local got
    cluster.on("SIGNOTASIGNAL", function(v) got = v end)
    cluster.emit("SIGNOTASIGNAL", 7)
    assert.equal(7, got)
    cluster.off("SIGNOTASIGNAL")
    local ok, err = pcall(function() cluster.on("SIGKILL", print) end)
    assert.is_false(ok)
    assert.matches("^spec/cluster_emitter_spec.lua:%d+: cluster.on: bad argument #1 %(event name%): cannot watch SIGKILL", tostring(err))
    assert.equal(0, cluster.listenerCount("SIGKILL"))
    H.finish()
  end)

  it("a worker's once('exit') listener runs once and the worker's off() works on real events", function()
    cluster.setupMaster { exec = H.fixture("worker.lua") }
    local w = cluster.fork()
    local removed = H.expect(nil, 0)
    w:on("online", removed)
    w:off("online", removed)
    w:once("online", H.expect(function() w:kill() end))
    w:once("exit", H.expect())
    assert.is_true(H.wait_until(function() return w:isDead() and not w:isConnected() end, 5000))
    H.finish()
  end)

  it("raises on a non-string event name or a non-function listener, naming the method", function()
    local e = Emitter.new()
    local ok, err = pcall(e.on, e, 1, print)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("on: bad argument #1 (event name)", 1, true))
    ok, err = pcall(e.once, e, "x", {})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("once: bad argument #2 (listener)", 1, true))
    H.finish()
  end)
end)
