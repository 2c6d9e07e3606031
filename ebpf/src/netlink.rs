//! rtnetlink helpers (no `ip` commands): the policy routing that makes `bpf_sk_assign`ed
//! packets local, and the host-side interface of a pod found from the routing table.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::IpProtocol;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::RedirectError;

/// `ip rule add fwmark <mark>/<mask> lookup <table> pref <priority>` +
/// `ip route add local 0.0.0.0/0 dev lo table <table>`, in the current netns.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRouting {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

async fn connect() -> Result<Handle, RedirectError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| RedirectError::Routing(format!("cannot open a netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

impl PolicyRouting {
    /// Install the rule and the route unless they are there already.
    pub async fn install(&self) -> Result<(), RedirectError> {
        let handle = connect().await?;
        // The rule.
        let mut rules = handle.rule().get(rtnetlink::IpVersion::V4).execute();
        let mut have_rule = false;
        while let Some(r) = rules
            .try_next()
            .await
            .map_err(|e| RedirectError::Routing(format!("cannot list ip rules: {e}")))?
        {
            let has = |a: RuleAttribute| r.attributes.contains(&a);
            if has(RuleAttribute::FwMark(self.mark))
                && has(RuleAttribute::FwMask(self.mask))
                && (has(RuleAttribute::Table(self.table)) || r.header.table as u32 == self.table)
            {
                have_rule = true;
            }
        }
        if !have_rule {
            let mut req = handle
                .rule()
                .add()
                .v4()
                .fw_mark(self.mark)
                .table_id(self.table)
                .priority(self.priority)
                .action(RuleAction::ToTable);
            req.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(self.mask));
            if let Err(e) = req.execute().await
                && !is_exists(&e)
            {
                return Err(RedirectError::Routing(format!(
                    "cannot add `fwmark {:#x}/{:#x} lookup {}`: {e}",
                    self.mark, self.mask, self.table
                )));
            }
        }
        // The route: local 0.0.0.0/0 dev lo table <table>.
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(1) // lo is ifindex 1 in every netns
            .table_id(self.table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        if let Err(e) = handle.route().add(route).execute().await
            && !is_exists(&e)
        {
            return Err(RedirectError::Routing(format!(
                "cannot add `local 0.0.0.0/0 dev lo table {}`: {e}",
                self.table
            )));
        }
        Ok(())
    }
}

impl PolicyRouting {
    /// Same-node HBONE: ztunnel's own connections to `<pod>:<hbone_port>` and its HBONE
    /// listener's packets back to `<pod>` are locally generated and would leave through the
    /// pod's veth (egress, where `bpf_sk_assign` is impossible). Two rules per enrolled local
    /// pod keep them in the node: `to <pod>/32 iif lo ipproto tcp dport|sport <hbone_port>
    /// lookup <table>` (the `local 0.0.0.0/0 dev lo` table). `iif lo` limits them to the
    /// node's own packets; forwarded pod traffic is not affected.
    pub async fn set_local_hbone_rules(
        &self,
        pod: Ipv4Addr,
        hbone_port: u16,
        present: bool,
    ) -> Result<(), RedirectError> {
        let handle = connect().await?;
        for dport in [true, false] {
            let mut msg = RuleMessage::default();
            msg.header.family = AddressFamily::Inet;
            msg.header.dst_len = 32;
            msg.header.action = RuleAction::ToTable;
            if self.table < 256 {
                msg.header.table = self.table as u8;
            }
            let range = RulePortRange {
                start: hbone_port,
                end: hbone_port,
            };
            msg.attributes.extend([
                RuleAttribute::Destination(IpAddr::V4(pod)),
                RuleAttribute::Iifname("lo".into()),
                RuleAttribute::IpProtocol(IpProtocol::Tcp),
                if dport {
                    RuleAttribute::DestinationPortRange(range)
                } else {
                    RuleAttribute::SourcePortRange(range)
                },
                RuleAttribute::Table(self.table),
                RuleAttribute::Priority(self.priority),
            ]);
            let what = format!(
                "to {pod}/32 iif lo ipproto tcp {} {hbone_port} lookup {}",
                if dport { "dport" } else { "sport" },
                self.table
            );
            if present {
                let mut req = handle.rule().add();
                *req.message_mut() = msg;
                if let Err(e) = req.execute().await
                    && !is_exists(&e)
                {
                    return Err(RedirectError::Routing(format!("cannot add `{what}`: {e}")));
                }
            } else if let Err(e) = handle.rule().del(msg).execute().await
                && !matches!(&e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENOENT)
            {
                return Err(RedirectError::Routing(format!(
                    "cannot delete `{what}`: {e}"
                )));
            }
        }
        Ok(())
    }
}

/// The host-side interface of a pod: the output interface of the node's route to the pod IP
/// (`ip route get <ip>`), which must be a directly connected route (no gateway) and not one of
/// the `uplinks` (that would mean the pod is not on this node).
pub async fn host_interface_for(
    ip: Ipv4Addr,
    uplinks: &[String],
) -> Result<(String, u32), RedirectError> {
    let err = |detail: String| RedirectError::Interface { ip, detail };
    let handle = connect().await?;
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: AddressFamily::Inet,
        destination_prefix_length: 32,
        ..RouteHeader::default()
    };
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| err(format!("route lookup failed: {e}")))?;
    let route = routes
        .first()
        .ok_or_else(|| err("no route to it in this network namespace".into()))?;
    if route.attributes.iter().any(|a| {
        matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if IpAddr::V4(*g) != IpAddr::V4(ip))
    }) {
        return Err(err("the route goes through a gateway, so the pod is not on this node".into()));
    }
    let ifindex = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
        .ok_or_else(|| err("the route has no output interface".into()))?;
    let ifname = ifname_of(ifindex).ok_or_else(|| err(format!("interface {ifindex} vanished")))?;
    if ifindex == 1 || uplinks.contains(&ifname) {
        return Err(err(format!(
            "the route goes out of {ifname}, so the pod is not on this node"
        )));
    }
    Ok((ifname, ifindex))
}

/// Name of an interface by index (`if_indextoname`).
pub fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires; it writes a NUL-terminated
    // name there or returns NULL.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated string within its bounds.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Index of an interface by name (`if_nametoindex`), `None` when there is none.
pub fn ifindex_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
