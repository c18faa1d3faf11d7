-- The Lua state's block cache (csrc/alloc.c): freed blocks are kept by size and
-- reused, never more than 4 MB of them, without changing what any object holds; a
-- state can opt out with LUACLUSTER_NO_BLOCK_CACHE.
local core = require "cluster.core"
local H = require "helper"

local LIMIT = 4 * 1024 * 1024

-- Builds n records of mixed sizes (tables, strings, closures) from a seed.
local function build(n, seed)
  local records = {}
  for i = 1, n do
    local tag = ("%d:%d:"):format(seed, i) .. ("x"):rep(i % 40)
    records[i] = { id = i, tag = tag, list = { i, i * 2, seed }, get = function() return tag end }
  end
  return records
end

local function check(records, n, seed)
  for i = 1, n do
    local r = records[i]
    local tag = ("%d:%d:"):format(seed, i) .. ("x"):rep(i % 40)
    if r.id ~= i or r.tag ~= tag or r.get() ~= tag or r.list[1] ~= i or r.list[2] ~= i * 2
       or r.list[3] ~= seed then
      return false, ("record %d of seed %d holds %s"):format(i, seed, tostring(r.tag))
    end
  end
  return true
end

-- Runs a Lua snippet in a fresh lua5.4 with `env` (a string of assignments) and
-- returns its standard output.
local function run_lua(env, code)
  local p = assert(io.popen(("%s lua5.4 -e %s 2>&1"):format(env, H.shell_quote(code))))
  local out = p:read("a")
  p:close()
  return out
end

describe("the block cache", function()
  -- (the suite run with LUACLUSTER_NO_BLOCK_CACHE set has no cache to look at)
  local it_cached = core.block_cache_bytes() and it or pending

  it_cached("is under this state, holding at most 4 MB", function()
    local held = core.block_cache_bytes()
    assert.is_true(math.type(held) == "integer" and held >= 0 and held <= LIMIT)
  end)

  it_cached("keeps freed blocks and gives them out again", function()
    local records = build(20000, 1)
    records = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    local held = core.block_cache_bytes()
    assert.is_true(held > 0, "nothing kept after a collection")
    assert.is_true(held <= LIMIT, "holds " .. held .. " bytes")
    local again = build(2000, 2)
    assert.is_true(core.block_cache_bytes() < held, "the new objects did not take kept blocks")
    assert.is_true(check(again, 2000, 2))
  end)

  it("hands out reused blocks that hold exactly what is written into them", function()
    for round = 1, 5 do
      local records = build(5000, round)
      local garbage = build(5000, -round) -- freed below, reused by the next round
      garbage = nil -- luacheck: ignore
      collectgarbage()
      local more = build(5000, round + 100)
      assert(check(records, 5000, round))
      assert(check(more, 5000, round + 100))
    end
  end)

  it("stays within 4 MB when far more is freed, and keeps working", function()
    local out = run_lua("", [[
      local core = require "cluster.core"
      local most = 0
      for round = 1, 4 do
        local t = {}
        for i = 1, 100000 do t[i] = { i, ("s"):rep(i % 200) } end
        t = nil
        collectgarbage()
        most = math.max(most, core.block_cache_bytes())
      end
      print(most > 1024 * 1024, most <= 4 * 1024 * 1024)]])
    assert.equals("true\ttrue\n", out)
  end)

  it("is installed once however often the core is loaded", function()
    local out = run_lua("", [[
      local core = require "cluster.core"
      local anchor = debug.getregistry()["cluster.block_cache"]
      package.loaded["cluster.core"] = nil
      local again = require "cluster.core"
      print(core ~= again, anchor ~= nil and debug.getregistry()["cluster.block_cache"] == anchor)]])
    assert.equals("true\ttrue\n", out)
  end)

  it("is left out when LUACLUSTER_NO_BLOCK_CACHE is set", function()
    local out = run_lua("LUACLUSTER_NO_BLOCK_CACHE=1", [[
      local core = require "cluster.core"
      local t = {} for i = 1, 50000 do t[i] = { i } end
      t = nil collectgarbage()
      print(core.block_cache_bytes(), debug.getregistry()["cluster.block_cache"])]])
    assert.equals("nil\tnil\n", out)
  end)

  it("gives the state back its allocator when it closes; blocks from either side free cleanly", function()
    -- the anchor's finalizer is what lua_close runs; called here, the state goes on
    -- with the previous allocator and frees the blocks the cache handed out
    local out = run_lua("", [[
      local core = require "cluster.core"
      local t = {} for i = 1, 50000 do t[i] = { i, tostring(i) } end
      t = nil collectgarbage()
      local held = core.block_cache_bytes()
      local kept = {} for i = 1, 20000 do kept[i] = { i, tostring(i) } end
      local anchor = debug.getregistry()["cluster.block_cache"]
      getmetatable(anchor).__gc(anchor)
      local after = core.block_cache_bytes()
      for i = 1, 20000 do assert(kept[i][1] == i and kept[i][2] == tostring(i)) end
      kept = nil collectgarbage()
      local more = {} for i = 1, 50000 do more[i] = { i } end
      more = nil collectgarbage()
      getmetatable(anchor).__gc(anchor) -- (a second call, as at close, does nothing)
      print(held > 0, after)]])
    assert.equals("true\tnil\n", out)
  end)
end)
