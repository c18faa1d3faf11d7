-- Every example that ends on its own (examples/run_all.sh's list: all but the servers
-- server.lua, counter.lua, supervisor.lua and sticky.lua) runs to exit 0 with this tree's
-- modules: the seeds' snippets keep working. (counter.lua and sticky.lua have specs of their own.)
local H = require "helper"

local LONG_RUNNING = { ["server.lua"] = true, ["counter.lua"] = true, ["supervisor.lua"] = true,
                       ["sticky.lua"] = true }

local function examples()
  local list = {}
  local p = io.popen("ls " .. H.shell_quote(H.ROOT .. "/examples"))
  for name in p:lines() do
    if name:match("%.lua$") and not LONG_RUNNING[name] then list[#list + 1] = name end
  end
  p:close()
  return list
end

describe("examples", function()
  before_each(H.setup)
  after_each(H.teardown)

  for _, name in ipairs(examples()) do
    it(name .. " runs to the end and exits 0", function()
      local out = H.tmpfile("example-out")
      -- timeout -k: a master that ignores SIGTERM gets SIGKILL 2 s later
      local ok, how, code = os.execute(string.format("cd %s && timeout -k 2 20 lua5.4 %s > %s 2>&1",
        H.shell_quote(H.ROOT), H.shell_quote("examples/" .. name), H.shell_quote(out)))
      assert(ok, string.format("%s: %s %s\n%s", name, tostring(how), tostring(code), H.read_file(out) or ""))
      H.finish()
    end)
  end
end)
