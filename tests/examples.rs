//! The runnable examples (examples/), headless against the real binary in dev mode.

mod common;

use common::*;

#[test]
fn scan_to_login_page_gets_its_states_from_the_phone_script() {
    dev_script_passes("example_scan.mjs");
}

#[test]
fn chat_page_on_the_js_client_carries_messages_between_two_tabs() {
    dev_script_passes("example_chat.mjs");
}

/// README.md's "Use it from a browser in five minutes": its page and its curl lines, as
/// written there.
#[test]
fn the_readme_browser_section_works_as_written() {
    dev_script_passes("readme_browser.mjs");
}
