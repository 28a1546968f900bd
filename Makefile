# Strata: the two set-up commands are `make demo` and `make test`.
# Each installs what it needs (Debian packages, Rust components) first.
# qemu-system-data provides the option ROMs (linuxboot_dma.bin,
# multiboot_dma.bin) that boot -kernel through SeaBIOS.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
QMP_VENV := target/qmp-venv
DEB_PACKAGES := seabios grub-rescue-pc qemu-utils strace acpica-tools gcc binutils qemu-system-data

.PHONY: demo test deps build lint images bench-boot qtest-peer

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@command -v rustup >/dev/null 2>&1 && rustup component add clippy rustfmt >/dev/null 2>&1 || true
	@# QEMU's own QMP client (qmp-shell), from the QEMU project's PyPI package:
	@# the QMP tests drive Strata with it as a management tool would.
	@[ -x $(QMP_VENV)/bin/qmp-shell ] || { python3 -m venv $(QMP_VENV) && $(QMP_VENV)/bin/pip install -q qemu.qmp==0.0.6; }

build: deps
	$(CARGO) build --release --bins

# Boots Debian's GRUB rescue CD as a live CD on a KVM PC (SeaBIOS, PIIX3
# IDE/ATAPI) on this terminal's serial console. Ctrl-A x quits.
demo: build
	./target/release/strata -m 512 -smp 2 -nographic -cdrom /usr/lib/grub-rescue/grub-rescue-cdrom.iso -boot d

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint
	$(CARGO) test --workspace
	tests/qtest-peer/run.sh

# QEMU 7.2's own qtest binaries (ide-test, qos-test's virtio-blk cases) run
# against strata; builds them from Debian's source package on first use
# (cached in ~/.cache/strata/qtest-peer). QTEST_PEER_FILTER=REGEX selects
# cases; tests/qtest-peer/expected-pass lists those that must pass.
qtest-peer: deps
	tests/qtest-peer/run.sh

bench-boot: build
	bench/boot.sh

images:
	images/build.sh
