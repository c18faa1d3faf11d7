# Development build in the tree: build/cluster/core.so, used with LUA_PATH/LUA_CPATH below.
# `make test` runs the specs under lua5.4; `make asan` runs them under ASan+UBSan.
LUA       ?= lua5.4
LUA_INC   ?= $(shell pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
UV_CFLAGS ?= $(shell pkg-config --cflags libuv 2>/dev/null)
UV_LIBS   ?= $(shell pkg-config --libs libuv 2>/dev/null || echo -luv)
CFLAGS    ?= -O2 -g
WARN      := -Wall -Wextra -Werror -std=gnu11
SRCS      := $(wildcard csrc/*.c)
HDRS      := $(wildcard csrc/*.h)
BUILD     ?= build
SO        := $(BUILD)/cluster/core.so

export LUA_PATH_5_4  := $(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;$(CURDIR)/spec/?.lua;;
export LUA_CPATH_5_4 := $(CURDIR)/$(BUILD)/?.so;;

.PHONY: all test test-plain asan bench soak clean deps run

# Debian packages the build, the tests and the main example need.
DEB_PACKAGES := lua5.4 liblua5.4-dev libuv1-dev lua-busted pkg-config gcc make
BENCH_PACKAGES := wrk nginx-light

all: $(SO)

# Installs what is missing when run as root; otherwise prints the exact apt-get line.
deps:
	@missing=""; for p in $(DEB_PACKAGES) $(EXTRA_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing Debian packages; run as root:"; \
	    echo "  apt-get update && apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

$(SO): $(SRCS) $(HDRS) | deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared $(LUA_INC) $(UV_CFLAGS) -o $@ $(SRCS) $(UV_LIBS) -lpthread -ldl

# The test command: the specs under ASan+UBSan, then the specs on the normal build
# (whose summary line, "busted: N passed, N failed", ends the output).
test: asan test-plain

test-plain: $(SO)
	$(LUA) /usr/bin/busted $(BUSTED_ARGS)

# The main job: the seed's server (a master forking one worker per CPU on port 8000).
run: $(SO)
	$(LUA) examples/server.lua

# AddressSanitizer + UndefinedBehaviorSanitizer: the sanitizer runtime is preloaded
# into the (uninstrumented) interpreter, master and workers alike.
ASAN_SO = $(shell $(CC) -print-file-name=libasan.so)
UBSAN_SO = $(shell $(CC) -print-file-name=libubsan.so)
asan: deps
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" all
	LD_PRELOAD="$(ASAN_SO) $(UBSAN_SO)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
	  LUA_CPATH_5_4="$(CURDIR)/build-asan/?.so;;" $(LUA) /usr/bin/busted $(BUSTED_ARGS)

bench: $(SO)
	$(MAKE) deps EXTRA_PACKAGES="$(BENCH_PACKAGES)"
	bash bench/run
	bash bench/http/run
	bash bench/http/herd
	bash bench/reload/run

# Does a long-running master leak? Five minutes of churn per scheduling policy
# (SOAK_SECONDS), a verdict per metric (bench/soak/run).
soak: $(SO)
	bash bench/soak/run

clean:
	rm -rf build build-asan
