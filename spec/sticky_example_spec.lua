-- examples/sticky.lua, sticky sessions built on worker:send(msg, socket), run as a
-- master of its own with two workers: clients come from several loopback addresses
-- (net.connect's localAddress), and every connection from one address must reach the
-- same worker, which counts that client's visits.
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"

local STICKY = H.ROOT .. "/examples/sticky.lua"
local CLOSE = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
local KEEP_ALIVE = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"

-- The answers in a connection's bytes: { {worker=, pid=, visit=, address=}, ... }.
local function answers(data)
  local list = {}
  for worker, pid, visit, address in data:gmatch("worker (%d+) %(pid (%d+)%): visit (%d+) from ([%d%.]+)\n") do
    list[#list + 1] = { worker = tonumber(worker), pid = tonumber(pid), visit = tonumber(visit), address = address }
  end
  return list
end

-- A connection from `address` with `request` written at once (before the master has
-- handed the socket to a worker); waited for until it closed.
local function start_visit(port, address, request)
  local opts = S.at(port)
  opts.localAddress = address
  return S.client(opts, request or CLOSE, true)
end

local function wait_closed(list)
  assert.is_true(H.wait_until(function()
    for _, r in ipairs(list) do if not r.done then return false end end
    return true
  end, 10000), "a connection never closed")
end

-- One Connection: close visit from `address`: its one answer.
local function visit(port, address)
  local r = start_visit(port, address)
  wait_closed { r }
  local a = answers(r.data)
  assert.equal(1, #a, r.data)
  assert.equal(address, a[1].address)
  return a[1]
end

local function start(port)
  local m = H.spawn_master(STICKY, {}, { PORT = tostring(port), WORKERS = "2" })
  assert(H.wait_until(function()
    local out = H.read_file(m.out) or ""
    return out:find("sticky sessions on", 1, true) and select(2, out:gsub("online", "")) == 2
  end, 5000, 20), "sticky.lua never listened: " .. tostring(H.read_file(m.err)))
  return m
end

-- SIGTERM: exit 0, and no worker left.
local function stop(m)
  local workers = S.children_of(m.pid)
  core.kill(m.pid, "SIGTERM")
  assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 6000, 20))
  assert.equal(0, H.master_status(m), H.read_file(m.err))
  assert.is_true(H.wait_until(function()
    for _, pid in ipairs(workers) do if H.alive(pid) then return false end end
    return true
  end, 3000, 20))
  H.cleanup_master(m)
end

describe("examples/sticky.lua", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  it("gives every connection from one client address to the same worker, which counts its visits; addresses spread over both workers", function()
    local port = S.free_port()
    local m = start(port)
    local addresses = { "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6" }
    local seen = {} -- address -> worker pid
    for round = 1, 3 do
      local list = {}
      for i, address in ipairs(addresses) do list[i] = start_visit(port, address) end -- all at once
      wait_closed(list)
      for i, r in ipairs(list) do
        local a = answers(r.data)
        assert.equal(1, #a, r.data)
        assert.equal(addresses[i], a[1].address)
        assert.equal(round, a[1].visit)
        if round == 1 then seen[addresses[i]] = a[1].pid else assert.equal(seen[addresses[i]], a[1].pid) end
      end
    end
    local pids = {}
    for _, pid in pairs(seen) do pids[pid] = true end
    local workers = S.children_of(m.pid)
    for pid in pairs(pids) do assert.truthy(H.alive(pid)) end
    assert.equal(2, #workers)
    assert.is_true(pids[workers[1]] and pids[workers[2]], "one worker served every address")
    stop(m)
  end)

  it("the requests a client writes before the hand-off all reach the worker: two pipelined on one keep-alive connection get two answers", function()
    local port = S.free_port()
    local m = start(port)
    local first = visit(port, "127.0.0.9")
    local r = start_visit(port, "127.0.0.9", KEEP_ALIVE .. CLOSE)
    wait_closed { r }
    local a = answers(r.data)
    assert.equal(2, #a, r.data)
    assert.same({ first.pid, 2 }, { a[1].pid, a[1].visit })
    assert.same({ first.pid, 3 }, { a[2].pid, a[2].visit })
    stop(m)
  end)

  it("a worker that dies is replaced in its slot: its clients go to the new worker, starting over; the other worker's clients keep theirs", function()
    local port = S.free_port()
    local m = start(port)
    local one, two = visit(port, "127.0.0.1"), visit(port, "127.0.0.2")
    assert.are_not.equal(one.pid, two.pid) -- (FNV-1a puts them in different slots of two)
    core.kill(one.pid, "SIGKILL")
    assert.is_true(H.wait_until(function()
      return (H.read_file(m.out) or ""):find("worker " .. one.worker .. " died (SIGKILL)", 1, true) ~= nil
    end, 5000, 20), H.read_file(m.out))
    local again = visit(port, "127.0.0.1")
    assert.are_not.equal(one.pid, again.pid)
    assert.are_not.equal(two.pid, again.pid)
    assert.equal(1, again.visit)
    local other = visit(port, "127.0.0.2")
    assert.same({ two.pid, 2 }, { other.pid, other.visit })
    assert.equal(2, #S.children_of(m.pid))
    stop(m)
  end)

  it("the master keeps no copy of the sockets it handed over: its descriptors come back to where they were after 200 connections", function()
    local port = S.free_port()
    local m = start(port)
    visit(port, "127.0.0.1")
    local before = S.settled_fd_count(m.pid)
    local addresses = { "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4" }
    for _ = 1, 4 do
      local list = {}
      for i = 1, 50 do list[i] = start_visit(port, addresses[i % 4 + 1]) end
      wait_closed(list)
      for _, r in ipairs(list) do assert.equal(1, #answers(r.data), r.data) end
    end
    assert.equal(before, S.settled_fd_count(m.pid))
    stop(m)
  end)
end)
