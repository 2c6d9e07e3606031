/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* zmesh eBPF redirection: every map layout shared by the C programs and the Rust loader
 * (ebpf/src/maps.rs mirrors these structs; keep them in sync).
 *
 * Maps (pinned by name under the bpffs dir, default /sys/fs/bpf/zmesh):
 *   zm_cfg   ARRAY[1]  key u32 0            -> struct zm_config     (ports, mark)
 *   zm_pods  HASH      key __be32 pod IPv4  -> struct zm_pod        (enrolled local pods)
 *   zm_stats PERCPU_ARRAY[ZM_STAT_MAX] u32  -> u64 counters (enum zm_stat)
 *
 * Marks / routing (node netns, installed by the loader through rtnetlink):
 *   skbs assigned to a proxy socket get skb->mark = ZM_PROXY_MARK, and
 *     ip rule  fwmark ZM_PROXY_MARK/ZM_PROXY_MARK_MASK lookup <table>
 *     ip route local 0.0.0.0/0 dev lo table <table>
 *   make the kernel deliver them locally (whatever their destination address).
 *   The proxy's own upstream sockets carry SO_MARK 0x539; they leave through egress hooks,
 *   where nothing is attached, so they are never redirected. */
#pragma once
#include <linux/types.h>

#define ZM_PROXY_MARK      0x400
#define ZM_PROXY_MARK_MASK 0xf00

struct zm_config {
	__u16 outbound_port;  /* host order: 15001 */
	__u16 inbound_port;   /* host order: 15006 */
	__u16 hbone_port;     /* host order: 15008 */
	__u16 _pad;
	__u32 mark;           /* ZM_PROXY_MARK */
	__u32 flags;          /* reserved */
};

#define ZM_POD_ENROLLED 1u

struct zm_pod {
	__u32 ifindex;        /* host-side veth of the pod (node netns) */
	__u32 flags;          /* ZM_POD_* */
};

enum zm_stat {
	ZM_STAT_ESTABLISHED = 0, /* assigned to an existing (proxy) socket */
	ZM_STAT_OUTBOUND = 1,    /* new connection -> outbound listener (15001) */
	ZM_STAT_INBOUND = 2,     /* new connection -> inbound plaintext listener (15006) */
	ZM_STAT_HBONE = 3,       /* new connection -> HBONE listener (15008) */
	ZM_STAT_DROP_NO_LISTENER = 4, /* fail closed: listener missing */
	ZM_STAT_ASSIGN_FAILED = 5,
	ZM_STAT_DROP_UNOWNED = 6, /* mid-flow packet from an enrolled pod without a proxy socket */
	ZM_STAT_MAX = 8,
};
