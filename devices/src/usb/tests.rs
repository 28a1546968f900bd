//! Control transfers from packets ([`control::ControlPipe`]) against a
//! real device.

use super::control::{ControlPipe, Pid};
use super::storage::{StorageOptions, UsbStorage};
use super::*;

fn packet(p: &mut ControlPipe, d: &mut UsbStorage, pid: Pid, data: &[u8]) -> (UsbResult, Vec<u8>) {
    let mut b = VecData(data.to_vec());
    let r = p.packet(d, pid, &mut b);
    let n = match r {
        UsbResult::Ack(n) => n,
        _ => 0,
    };
    b.0.truncate(n);
    (r, b.0)
}

#[test]
fn enumeration_through_packets() {
    let mut d = UsbStorage::new(StorageOptions::default());
    d.set_speed(Speed::Full);
    let mut p = ControlPipe::new();
    // GET_DESCRIPTOR(DEVICE, 18) in 8-byte packets.
    let setup = [0x80, 6, 0, 1, 0, 0, 18, 0];
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &setup).0,
        UsbResult::Ack(8)
    );
    let mut desc = Vec::new();
    for want in [8, 8, 2] {
        let (r, b) = packet(&mut p, &mut d, Pid::In, &[0; 8]);
        assert_eq!(r, UsbResult::Ack(want));
        desc.extend(b);
    }
    assert_eq!(packet(&mut p, &mut d, Pid::Out, &[]).0, UsbResult::Ack(0));
    assert_eq!(desc.len(), 18);
    assert_eq!(&desc[8..10], &[0xf4, 0x46]);

    // SET_ADDRESS takes effect after its status stage.
    let setup = [0, 5, 12, 0, 0, 0, 0, 0];
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &setup).0,
        UsbResult::Ack(8)
    );
    assert_eq!(d.address(), 0);
    assert_eq!(packet(&mut p, &mut d, Pid::In, &[]).0, UsbResult::Ack(0));
    assert_eq!(d.address(), 12);

    // A request the device refuses: the SETUP is taken, the rest STALLs
    // until the next SETUP.
    let setup = [0x80, 6, 0, 0x22, 0, 0, 64, 0];
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &setup).0,
        UsbResult::Ack(8)
    );
    assert_eq!(packet(&mut p, &mut d, Pid::In, &[0; 8]).0, UsbResult::Stall);
    assert_eq!(packet(&mut p, &mut d, Pid::Out, &[]).0, UsbResult::Stall);
    // A SETUP that is not 8 bytes.
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &[0; 7]).0,
        UsbResult::Stall
    );

    // An OUT data stage (SET_SEL, 6 bytes), then its status.
    let setup = [0, 48, 0, 0, 0, 0, 6, 0];
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &setup).0,
        UsbResult::Ack(8)
    );
    assert_eq!(
        packet(&mut p, &mut d, Pid::Out, &[1; 6]).0,
        UsbResult::Ack(6)
    );
    assert_eq!(
        packet(&mut p, &mut d, Pid::Out, &[1]).0,
        UsbResult::Stall,
        "beyond wLength"
    );
    assert_eq!(
        packet(&mut p, &mut d, Pid::Setup, &setup).0,
        UsbResult::Ack(8)
    );
    assert_eq!(
        packet(&mut p, &mut d, Pid::Out, &[1; 6]).0,
        UsbResult::Ack(6)
    );
    assert_eq!(packet(&mut p, &mut d, Pid::In, &[]).0, UsbResult::Ack(0));

    // SET_CONFIGURATION, then GET_CONFIGURATION read early-terminated.
    packet(&mut p, &mut d, Pid::Setup, &[0, 9, 1, 0, 0, 0, 0, 0]);
    assert_eq!(packet(&mut p, &mut d, Pid::In, &[]).0, UsbResult::Ack(0));
    packet(&mut p, &mut d, Pid::Setup, &[0x80, 8, 0, 0, 0, 0, 1, 0]);
    assert_eq!(
        packet(&mut p, &mut d, Pid::In, &[0; 8]),
        (UsbResult::Ack(1), vec![1])
    );
    assert_eq!(packet(&mut p, &mut d, Pid::Out, &[]).0, UsbResult::Ack(0));
    // Packets with no transfer in progress STALL.
    assert_eq!(packet(&mut p, &mut d, Pid::In, &[0; 8]).0, UsbResult::Stall);
}

#[test]
fn speeds_and_endpoints() {
    assert_eq!(
        best_speed(
            &[Speed::Full, Speed::High, Speed::Super],
            &[Speed::Low, Speed::Full]
        ),
        Some(Speed::Full)
    );
    assert_eq!(best_speed(&[Speed::Super], &[Speed::Full]), None);
    let e = Endpoint::from_address(0x81);
    assert_eq!(
        (e.number(), e.dir(), e.address(), e.index()),
        (1, Dir::In, 0x81, 17)
    );
    assert_eq!(Endpoint::new(18, Dir::Out).number(), 2);
}
