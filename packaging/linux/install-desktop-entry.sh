#!/bin/sh
# Add Latent Studio to the desktop's application menu for the current user: installs the
# .desktop entry (pointing at the binary in this folder) and the icon under ~/.local/share.
# Run it again after moving the folder. Remove with: rm ~/.local/share/applications/latent-studio.desktop
set -eu
here=$(cd "$(dirname "$0")" && pwd)
data=${XDG_DATA_HOME:-$HOME/.local/share}
mkdir -p "$data/applications" "$data/icons/hicolor/256x256/apps"
cp "$here/latent-studio.png" "$data/icons/hicolor/256x256/apps/latent-studio.png"
sed "s|^Exec=.*|Exec=\"$here/latent-studio\"|" "$here/latent-studio.desktop" \
    > "$data/applications/latent-studio.desktop"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$data/applications" || true
echo "installed $data/applications/latent-studio.desktop -> $here/latent-studio"
