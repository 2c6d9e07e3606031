// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* zmesh transparent redirection: tc ingress (TCX) + bpf_sk_assign() to ztunnel's
 * IP_TRANSPARENT listeners in the node netns. Map layouts: zmesh_redirect.h.
 *
 *   zm_from_pod : ingress of the host side of an enrolled pod's veth (pod -> node).
 *                 Packets of existing node sockets (proxied flows, replies to ztunnel's
 *                 spoofed upstream sockets) go to that socket; new TCP connections go to the
 *                 outbound listener (15001). No listener -> DROP (fail closed).
 *   zm_to_pod   : ingress of the node's uplink(s) (remote -> enrolled local pod), and of the
 *                 veths of local pods that are not enrolled (local pod -> enrolled pod).
 *                 Existing node sockets first; new connections to an enrolled pod go to
 *                 the HBONE listener (dport 15008) or the inbound plaintext listener (15006).
 *                 No listener -> DROP (fail closed).
 * Only IPv4/TCP with a 20-byte IP header is steered; an enrolled pod's TCP with IP options
 * is dropped; everything else (IPv6, UDP, ...) passes. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "zmesh_redirect.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct zm_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct zm_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ZM_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zm_stats SEC(".maps");

static __always_inline void stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&zm_stats, &idx);
	if (v)
		*v += 1;
}

/* Assign skb to the socket of an existing flow in this netns (not a listener, not TIME_WAIT).
 * Returns 1 when handled (*verdict set), 0 when there is no such socket. */
static __always_inline int assign_established(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					      __u32 mark, int *verdict)
{
	struct bpf_sock *sk;
	long err;

	sk = bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	if (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT) {
		bpf_sk_release(sk);
		return 0;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		stat(ZM_STAT_ASSIGN_FAILED);
		*verdict = TC_ACT_SHOT;
		return 1;
	}
	skb->mark = mark;
	stat(ZM_STAT_ESTABLISHED);
	*verdict = TC_ACT_OK;
	return 1;
}

/* Hand a new connection (pure SYN) to the listener on `port`; drop when it is missing. */
static __always_inline int assign_listener(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					   __u16 port, __u32 mark, __u32 what)
{
	struct bpf_sock *sk;
	long err;

	tuple->ipv4.dport = bpf_htons(port);
	sk = bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		stat(ZM_STAT_DROP_NO_LISTENER);
		return TC_ACT_SHOT; /* fail closed */
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		stat(ZM_STAT_DROP_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		stat(ZM_STAT_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	skb->mark = mark;
	stat(what);
	return TC_ACT_OK;
}

static __always_inline int steer(struct __sk_buff *skb, int from_pod)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple tuple = {};
	struct zm_config *cfg;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u32 zero = 0, mark;
	__u16 port;
	int verdict = TC_ACT_OK;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	if (ip->ihl != 5) {
		/* IP options are not parsed: never let an enrolled pod's TCP out that way. */
		if (from_pod && bpf_map_lookup_elem(&zm_pods, &ip->saddr)) {
			stat(ZM_STAT_DROP_UNOWNED);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;

	/* from a pod: only enrolled sources (a link left behind after unenroll does nothing);
	 * to a pod: only enrolled destinations. */
	if (!bpf_map_lookup_elem(&zm_pods, from_pod ? &ip->saddr : &ip->daddr))
		return TC_ACT_OK;
	/* zm_to_pod on a local pod's veth whose pod just became enrolled: zm_from_pod owns it. */
	if (!from_pod && bpf_map_lookup_elem(&zm_pods, &ip->saddr))
		return TC_ACT_OK;

	cfg = bpf_map_lookup_elem(&zm_cfg, &zero);
	if (!cfg || !cfg->outbound_port)
		return TC_ACT_SHOT; /* enrolled but not configured: fail closed */
	mark = cfg->mark;

	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;

	if (assign_established(skb, &tuple, mark, &verdict))
		return verdict;

	if (!tcp->syn || tcp->ack) {
		/* Mid-flow packet of a flow no node socket owns. From an enrolled pod it must not
		 * reach the network in clear (e.g. retransmissions after ztunnel died): drop it,
		 * except RSTs (no payload; they let the pod's stack clean up quickly). Towards a
		 * pod it is harmless: pass. */
		if (from_pod && !tcp->rst) {
			stat(ZM_STAT_DROP_UNOWNED);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}

	if (from_pod) {
		port = cfg->outbound_port;
		return assign_listener(skb, &tuple, port, mark, ZM_STAT_OUTBOUND);
	}
	if (tcp->dest == bpf_htons(cfg->hbone_port))
		return assign_listener(skb, &tuple, cfg->hbone_port, mark, ZM_STAT_HBONE);
	port = cfg->inbound_port;
	return assign_listener(skb, &tuple, port, mark, ZM_STAT_INBOUND);
}

SEC("classifier") /* aya 0.14 only knows the "classifier" section name */
int zm_from_pod(struct __sk_buff *skb)
{
	return steer(skb, 1);
}

SEC("classifier")
int zm_to_pod(struct __sk_buff *skb)
{
	return steer(skb, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
