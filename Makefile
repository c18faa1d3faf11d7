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

.PHONY: all test asan bench clean deps run

all: $(SO)

$(SO): $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared $(LUA_INC) $(UV_CFLAGS) -o $@ $(SRCS) $(UV_LIBS) -lpthread -ldl

test: $(SO)
	$(LUA) /usr/bin/busted $(BUSTED_ARGS)

# AddressSanitizer + UndefinedBehaviorSanitizer: the sanitizer runtime is preloaded
# into the (uninstrumented) interpreter, master and workers alike.
ASAN_SO = $(shell $(CC) -print-file-name=libasan.so)
UBSAN_SO = $(shell $(CC) -print-file-name=libubsan.so)
asan:
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" all
	LD_PRELOAD="$(ASAN_SO) $(UBSAN_SO)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
	  LUA_CPATH_5_4="$(CURDIR)/build-asan/?.so;;" $(LUA) /usr/bin/busted $(BUSTED_ARGS)

bench: $(SO)
	bash bench/run

clean:
	rm -rf build build-asan
