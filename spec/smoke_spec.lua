describe("cluster.core", function()
  it("loads and reports the message size limit", function()
    local core = require "cluster.core"
    assert.is_true(core.MAX_MESSAGE >= 64 * 1024 * 1024)
  end)
end)
