# Strata: the two set-up commands are `make demo` and `make test`.
# Each installs what it needs (Debian packages, Rust components) first.
# qemu-system-data provides the option ROMs (linuxboot_dma.bin,
# multiboot_dma.bin) that boot -kernel through SeaBIOS.
# bzip2: the tests unpack the sample images and compress dmg chunks with it.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
QMP_VENV := target/qmp-venv
# g++ builds libFuzzer for `make fuzz`. libcurl4-openssl-dev: the http, https,
# ftp and ftps block drivers link the system libcurl. librbd-dev/librados-dev:
# the rbd driver (left out of builds without them); ceph-mon, ceph-osd and
# ceph-common: the throwaway Ceph cluster its tests start. libssl-dev and
# pkg-config build libssh2 (the ssh driver); openssh-server, nfs-ganesha(-vfs),
# rpcbind and tgt are the servers the ssh, nfs and iscsi driver tests run.
# qemu-block-extra (qemu-img's rbd, curl, ssh, nfs and iscsi drivers, the
# tests' oracle) is installed below, at qemu-utils' own version.
# mtools and dosfstools: the vvfat tests read the FAT images Strata makes
# with mtools (mdir, mcopy) and check them with fsck.vfat, and build the
# guest's changes with mtools.
DEB_PACKAGES := seabios grub-rescue-pc qemu-utils bzip2 strace acpica-tools gcc g++ binutils qemu-system-data openssl xorriso libcurl4-openssl-dev ceph-mon ceph-osd ceph-common librbd-dev librados-dev libssl-dev pkg-config openssh-server nfs-ganesha nfs-ganesha-vfs rpcbind tgt mtools dosfstools

.PHONY: demo test check deps build lint images guest bench bench-boot fuzz fuzz-build fuzz-cmin qtest-fuzz qtest-peer

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# qemu-block-extra (qemu-img's iscsi, rbd, curl, ssh and nfs drivers,
	@# the network storage tests' and benchmarks' oracle) must be qemu-utils'
	@# own version: a plain install
	@# would replace a backports qemu-utils with the release's. A backports
	@# qemu-utils gets the backports suite of the machine's Debian source.
	@dpkg -s qemu-block-extra >/dev/null 2>&1 || { v=$$(dpkg-query -W -f='$${Version}' qemu-utils 2>/dev/null); \
		case "$$v" in *bpo12*) [ -f /etc/apt/sources.list.d/strata-backports.sources ] || \
			sed -n '1,/^$$/p' /etc/apt/sources.list.d/debian.sources | sed 's/^Suites:.*/Suites: bookworm-backports/' | \
			$(SUDO) tee /etc/apt/sources.list.d/strata-backports.sources >/dev/null;; esac; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends qemu-block-extra=$$v \
		|| echo "qemu-block-extra $$v is not installable: the network storage tests that compare with qemu-img will fail"; }
	@command -v rustup >/dev/null 2>&1 && rustup component add clippy rustfmt >/dev/null 2>&1 || true
	@# QEMU's own QMP client (qmp-shell), from the QEMU project's PyPI package:
	@# the QMP tests drive Strata with it as a management tool would.
	@[ -x $(QMP_VENV)/bin/qmp-shell ] || { python3 -m venv $(QMP_VENV) && $(QMP_VENV)/bin/pip install -q qemu.qmp==0.0.6; }
	@# pyftpdlib and pyOpenSSL (its TLS): the FTP and FTPS servers of the
	@# ftp and ftps block drivers' tests.
	@[ -d $(QMP_VENV)/lib/python3*/site-packages/pyftpdlib ] || $(QMP_VENV)/bin/pip install -q pyftpdlib==2.2.0
	@[ -d $(QMP_VENV)/lib/python3*/site-packages/OpenSSL ] || $(QMP_VENV)/bin/pip install -q pyopenssl==26.4.0

build: deps
	$(CARGO) build --release --bins

# Boots Debian's GRUB rescue CD as a live CD on a KVM PC (SeaBIOS, PIIX3
# IDE/ATAPI) on this terminal's serial console. Ctrl-A x quits.
demo: build
	./target/release/strata -m 512 -smp 2 -nographic -cdrom /usr/lib/grub-rescue/grub-rescue-cdrom.iso -boot d

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test: lints, the workspace tests (which replay the fuzz corpora),
# QEMU's own qtests against strata (the peer suite), then the fuzz stage:
# each cargo-fuzz target for FUZZ_SECONDS and the qtest device fuzzer for
# QTEST_FUZZ_SECS.
test: check qtest-peer qtest-fuzz fuzz

# The lints and the workspace tests, without the peer suite and fuzzing.
check: lint guest
	$(CARGO) test --workspace

# The Linux test guest's kernel, built from Debian's linux-source-6.1 with
# images/linux-kernel's configuration and patch (cached in
# ~/.cache/strata/linux-kernel, keyed by a hash of the inputs; about 6
# minutes on 2 cores the first time).
guest: deps
	images/linux-kernel/build.sh >/dev/null

# QEMU 7.2's own qtest binaries (ide-test, ahci-test, fdc-test,
# fuzz-lsi53c895a-test, qos-test's virtio-blk and virtio-scsi cases) run
# against strata; builds them from Debian's source package on first use
# (cached in ~/.cache/strata/qtest-peer). QTEST_PEER_FILTER=REGEX selects
# cases; tests/qtest-peer/expected-pass lists those that must pass.
qtest-peer: deps
	tests/qtest-peer/run.sh

# cargo-fuzz needs nightly-only rustc flags (-Z sanitizer, coverage
# instrumentation); RUSTC_BOOTSTRAP=1 lets the stable toolchain accept
# them. AddressSanitizer stays on.
FUZZ_SECONDS ?= 15
FUZZ_TARGETS ?= pc_io scsi_cdb lsi usb_bot usb_ccid usb_ehci usb_uas usb_uhci xhci_ring virtio_chain qcow2_open vpc_open vdi_open vmdk_open vhdx_open ata_taskfile ahci_command keyval nbd_proto iscsi_pdu net_uri nfs_rpc qmp_input web_headers bochs_open cloop_open dmg_open parallels_open luks_open qed_open qcow_open vvfat_rw migration_stream vhost_user vduse
FUZZ_ENV := RUSTC_BOOTSTRAP=1
# -timeout: one input running longer is a hang; -rss_limit_mb bounds
# memory. New inputs go to fuzz/out/TARGET, never into the committed
# corpus (which is only read); `make fuzz-cmin` merges them in minimised.
FUZZ_FLAGS ?= -timeout=20 -rss_limit_mb=2048 -print_final_stats=1

fuzz-build: deps
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	cd fuzz && $(FUZZ_ENV) cargo fuzz build $(FUZZ_BUILD_FLAGS)

fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/out/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS)s (log: fuzz/out/$$t.log)"; \
		if ! (cd fuzz && $(FUZZ_ENV) cargo fuzz run $(FUZZ_BUILD_FLAGS) $$t out/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS)) >fuzz/out/$$t.log 2>&1; then \
			tail -n 80 fuzz/out/$$t.log; echo "fuzz target $$t FAILED"; exit 1; \
		fi; \
		grep -E '^(stat::number_of_executed_units|stat::new_units_added|stat::peak_rss_mb|Done )' fuzz/out/$$t.log; \
	done

# Folds the inputs found by `make fuzz` into the committed corpora:
# libFuzzer's merge (what `cargo fuzz cmin` runs) adds only the inputs
# that bring new coverage and never drops a committed one (named seeds
# stay). Inputs over FUZZ_CMIN_MAX_BYTES are left out to keep the
# repository small.
FUZZ_CMIN_MAX_BYTES ?= 4096
fuzz-cmin: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
		rm -rf fuzz/out/$$t.small; mkdir -p fuzz/out/$$t fuzz/out/$$t.small; \
		find fuzz/out/$$t -type f -size -$$(($(FUZZ_CMIN_MAX_BYTES) + 1))c -exec cp {} fuzz/out/$$t.small/ \; ; \
		(cd fuzz && $(FUZZ_ENV) cargo fuzz run $(FUZZ_BUILD_FLAGS) $$t corpus/$$t out/$$t.small -- -merge=1) \
			>fuzz/out/$$t.cmin.log 2>&1 || { tail -n 40 fuzz/out/$$t.cmin.log; exit 1; }; \
		echo "$$t: $$(ls fuzz/corpus/$$t | wc -l) inputs, $$(cat fuzz/corpus/$$t/* | wc -c) bytes"; \
	done

# The qtest-level device fuzzer (cli/tests/qtest_fuzz.rs) for longer than
# the short run `cargo test` gives it.
QTEST_FUZZ_SECS ?= 60
qtest-fuzz: deps
	STRATA_QTEST_FUZZ_SECS=$(QTEST_FUZZ_SECS) $(CARGO) test -p cli --test qtest_fuzz -- --nocapture

bench-boot: build
	bench/boot.sh

images:
	images/build.sh

# Issue 17's comparison set (virtio-blk on null-co and tmpfs, quiet and
# with a CPU hog, and strata-img convert and qcow2 writes against
# qemu-img on tmpfs, quiet and with the hog), printed as one table. BENCH_RUNS alternating runs per VMM (at least 5).
BENCH_RUNS ?= 5
bench: deps
	$(CARGO) build --release --bins
	bench/all.sh $(BENCH_RUNS) 2
