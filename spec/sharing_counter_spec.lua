-- examples/counter.lua, the seed's request counter, run as a master of its own: its
-- workers share PORT, every request reaches the master's count, and SIGTERM or SIGINT
-- stops it with exit 0 and no worker left.
local core = require "cluster.core"
local H = require "helper"
local S = require "fixtures.share_lib"

local COUNTER = H.ROOT .. "/examples/counter.lua"

-- One HTTP/1.1 request with Connection: close; returns the record once closed.
local function get(port)
  return S.ask(S.at(port), "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", true)
end

local function start(port)
  local m = H.spawn_master(COUNTER, {}, { PORT = tostring(port) })
  local up = H.wait_until(function()
    local r = S.client(S.at(port))
    H.wait_until(function() return r.connected or r.done end, 1000)
    local ok = r.connected
    r.sock:destroy()
    return ok
  end, 5000, 50)
  assert(up, "counter.lua never listened: " .. tostring(H.read_file(m.err)))
  return m
end

describe("examples/counter.lua", function()
  before_each(H.setup)
  after_each(function()
    S.close_tracked()
    H.teardown()
  end)

  for _, signal in ipairs { "SIGTERM", "SIGINT" } do
    it("counts every request its workers serve on PORT and exits 0 on " .. signal .. " with no worker left", function()
      local port = S.free_port()
      local m = start(port)
      local workers = S.children_of(m.pid)
      assert.is_true(#workers >= 1)
      for _ = 1, 5 do
        local r = get(port)
        assert.truthy(r.data:find("^HTTP/1.1 200 OK\r\n"))
        assert.truthy(r.data:find("hello world\n$"))
      end
      assert.is_true(H.wait_until(function()
        return (H.read_file(m.out) or ""):find("numReqs = 5\n", 1, true) ~= nil
      end, 3000, 50), H.read_file(m.out))
      core.kill(m.pid, signal)
      assert.is_true(H.wait_until(function() return H.master_status(m) ~= nil end, 5000, 20))
      assert.equal(0, H.master_status(m))
      assert.truthy(H.read_file(m.out):find(signal .. ": stopping; numReqs = 5\n", 1, true))
      assert.is_true(H.wait_until(function()
        for _, pid in ipairs(workers) do if H.alive(pid) then return false end end
        return true
      end, 3000, 20))
      H.cleanup_master(m)
    end)
  end
end)
