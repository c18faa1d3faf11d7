-- What bench/soak/run measures over minutes, in small: a master that forks and loses
-- workers by every way there is, while they listen on shared TCP, unix and UDP
-- addresses, take and send big nested messages and pass sockets and servers both ways,
-- keeps nothing of them once they are gone. Behaviour, not timing: after the churn the
-- master's descriptors are the ones it had before it (after a warm-up, for what libuv
-- opens once), its internal tables hold no dead worker and no shared address, and it
-- ends on its own. Each policy in a master of its own (spec/fixtures/soak_leak_master.lua).
local H = require "helper"

local MASTER = H.fixture("soak_leak_master.lua")
local WARM, CYCLES = 14, 70   -- workers: two rounds of the seven fates, then ten

describe("a master that churns workers", function()
  before_each(H.setup)
  after_each(H.teardown)

  for _, policy in ipairs { "rr", "none" } do
    it("(" .. policy .. ") after " .. CYCLES .. " workers that listened, exchanged messages and handles and ended (exit 0, crash, SIGKILL, SIGTERM, disconnect, worker-side kill, loop end), holds the same descriptors as before them, no worker in cluster.workers or cluster._all, no shared address, and ends on its own", function()
      local dir = H.tmpname("soakdir")
      os.remove(dir)
      assert(os.execute("mkdir -p " .. H.shell_quote(dir)))
      local m = H.spawn_master(MASTER, { dir, tostring(WARM), tostring(CYCLES) }, { CLUSTER_SCHED_POLICY = policy })
      local ended = H.wait_until(function() return H.master_status(m) ~= nil end, 60000)
      local out, err, status = H.read_file(m.out) or "", H.read_file(m.err) or "", H.master_status(m)
      H.cleanup_master(m)
      os.execute("rm -rf " .. H.shell_quote(dir))
      assert.is_true(ended, "the master did not end on its own: something kept its loop alive\n" .. out .. err)
      assert.equal(0, status, err)
      local got = {}
      for key, a, b in out:gmatch("(%a+) (%d+) ?(%d*)") do got[key] = { tonumber(a), tonumber(b) } end
      assert.is_table(got.fds, out)
      assert.equal(got.fds[1], got.fds[2], "descriptors before the churn and after it\n" .. out)
      assert.equal(0, got.workers[1], "cluster.workers")
      assert.equal(0, got.all[1], "cluster._all")
      assert.equal(0, got.entries[1], "shared addresses")
      assert.equal(WARM + CYCLES, got.ended[1], "workers ended")
      -- every listen succeeded, and every worker went through every exchange before its end
      assert.equal(0, got.failed[1], "listens that failed\n" .. out)
      assert.equal(WARM + CYCLES, got.driven[1], "workers driven")
      assert.equal("", err)
    end)
  end
end)
