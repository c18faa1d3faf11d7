--- The rockspec builds what the tree holds: `luarocks make` compiles every C file of
-- csrc/ into cluster.core and installs every module of lua/cluster/ under its name (a C
-- file left out of the list built a core.so that could not load: idle.c once was).
local H = require "helper"

local function listing(dir, suffix)
  local names = {}
  local p = assert(io.popen("ls -1 '" .. dir .. "'"))
  for name in p:lines() do
    if name:sub(-#suffix) == suffix then names[#names + 1] = name end
  end
  p:close()
  table.sort(names)
  return names
end

local function load_rockspec()
  local path = H.ROOT .. "/luacluster-scm-1.rockspec"
  local env = {}
  assert(loadfile(path, "t", env))()
  return env
end

local function sorted(t) table.sort(t) return t end

describe("luacluster-scm-1.rockspec", function()
  it("compiles every C file of csrc/ into cluster.core, and nothing else", function()
    local spec = load_rockspec()
    local core = spec.build.modules["cluster.core"]
    local want = {}
    for _, f in ipairs(listing(H.ROOT .. "/csrc", ".c")) do want[#want + 1] = "csrc/" .. f end
    assert.same(want, sorted({ table.unpack(core.sources) }))
    assert.same({ "uv", "pthread", "dl" }, core.libraries)
  end)

  it("installs every Lua module of lua/cluster/ under its require name", function()
    local spec = load_rockspec()
    local want, got = {}, {}
    for _, f in ipairs(listing(H.ROOT .. "/lua/cluster", ".lua")) do
      local mod = f == "init.lua" and "cluster" or "cluster." .. f:sub(1, -5)
      want[mod] = "lua/cluster/" .. f
    end
    for name, src in pairs(spec.build.modules) do
      if type(src) == "string" then got[name] = src end
    end
    assert.same(want, got)
  end)

  it("asks for Lua 5.4 and libuv", function()
    local spec = load_rockspec()
    assert.same({ "lua >= 5.4, < 5.5" }, spec.dependencies)
    assert.equal("uv.h", spec.external_dependencies.LIBUV.header)
  end)
end)
