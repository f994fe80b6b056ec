#!/usr/bin/env bash
# Gather the real photos the default model is trained and tested on, into DEST/train and DEST/holdout.
#
#   bash scripts/get_photos.sh data        # then: latentlink train --data data/train ...
#
# Training photos: 35 photos from Debian's wallpaper packages (mate-backgrounds, plasma-workspace-wallpapers,
# lomiri-wallpapers-*): landscapes, plants, water, and the animals, food and colours of the Lomiri set.
# More training photos, in DEST/extra: 28 colour photos from OpenCV's sample data (Debian's opencv-doc: food,
# people, streets, animals, objects) and matplotlib's portrait of Grace Hopper; small (0.1 to 1.4 megapixels) but
# far more varied than the wallpapers.
# Held out (never trained on): 3 more of those photos plus scikit-image's 5 colour sample photos.
# Video clips, in DEST/video (for `latentlink eval --video`, never trained on): OpenCV's sample clips vtest.avi
# (a fixed street-surveillance camera, 768x576, 795 frames: the product's own use), Megamind.avi and tree.avi.
# Needs apt-get (Debian/Ubuntu) and the [export] extra (scikit-image, matplotlib). No root needed.
set -euo pipefail
dest=${1:-data}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
packages="mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 opencv-doc"
# shellcheck disable=SC2086  # one word per package
(cd "$work" && apt-get download $packages >/dev/null 2>&1 \
  || { echo "apt-get download failed: run on Debian/Ubuntu with package lists (sudo apt-get update)" >&2; exit 1; })
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/x"; done
share="$work/x/usr/share"
mkdir -p "$dest/train" "$dest/extra" "$dest/holdout" "$dest/video"

train=(mate/nature/Aqua mate/nature/Blinds mate/nature/Dune mate/nature/Garden mate/nature/GreenMeadow
       mate/nature/RainDrops mate/nature/Storm mate/nature/TwoWings mate/nature/Wood mate/nature/YellowFlower
       BytheWater ColdRipple ColorfulCups DarkestHour FallenLeaf Grey Kite OneStandsOut Volna summer_1am
       lomiri/Bridge_by_Sander_Klootwijk lomiri/Dragonfly_by_Bolly lomiri/Infinite-Sea_by_Aury88
       lomiri/Kleiber_by_Lukas_Baubkus lomiri/Picture_0B_by_freespace lomiri/Picture_1A_by_freespace
       lomiri/Wine_by_Jakkub_Mede lomiri/aitzgorri_by_Aitzol_Berasategi lomiri/free_by_Peter_Nerlich
       lomiri/friends_by_Aitzol_Berasategi lomiri/greentock_by_Peter_Nerlich lomiri/life_by_Aitzol_Berasategi
       lomiri/picosdeeuropa_by_Aitzol_Berasategi lomiri/seeding_by_Clements_Engelhardt
       lomiri/sunset_by_Aitzol_Berasategi)
holdout=(mate/nature/LadyBird EveningGlow Path)

copy() {  # copy NAME into folder $2: MATE and Lomiri photos by path, Plasma wallpapers by their largest JPEG
  local name=$1 to=$2 src
  if [[ $name == mate/* ]]; then
    src="$share/backgrounds/$name.jpg"
  elif [[ $name == lomiri/* ]]; then
    src="$share/backgrounds/${name#lomiri/}.jpg"
  else
    src=$(ls -S "$share/wallpapers/$name/contents/images/"*.jpg | head -n 1)
  fi
  cp "$src" "$to/$(basename "$name").jpg"
}
for n in "${train[@]}"; do copy "$n" "$dest/train"; done
for n in "${holdout[@]}"; do copy "$n" "$dest/holdout"; done

examples="$share/doc/opencv-doc/examples"
for name in alphamat/input_images/plant.jpg data/aero1.jpg data/aloeL.jpg data/apple.jpg data/baboon.jpg \
            data/board.jpg data/building.jpg data/butterfly.jpg data/chicky_512.png data/ela_original.jpg \
            data/fruits.jpg data/graf1.png data/home.jpg data/left.jpg data/leuvenA.jpg \
            data/licenseplate_motion.jpg data/messi5.jpg data/orange.jpg data/rubberwhale1.png data/smarties.png \
            data/squirrel_cls.jpg data/stuff.jpg text/scenetext01.jpg text/scenetext02.jpg text/scenetext03.jpg \
            text/scenetext04.jpg text/scenetext05.jpg text/scenetext06.jpg; do
  cp "$examples/$name" "$dest/extra/opencv-$(basename "$name")"
done
for name in vtest.avi Megamind.avi tree.avi; do  # Megamind_bugy.avi is left out: a deliberately broken file
  cp "$examples/data/$name" "$dest/video/$name"
done
python3 -c 'import sys, shutil, matplotlib.cbook as c
shutil.copy(c.get_sample_data("grace_hopper.jpg", asfileobj=False), sys.argv[1])' "$dest/extra/matplotlib-grace_hopper.jpg"

python3 - "$dest/holdout" <<'PY'
import sys, cv2, skimage.data as d
photos = {"astronaut": d.astronaut(), "chelsea": d.chelsea(), "coffee": d.coffee(), "rocket": d.rocket(),
          "motorcycle": d.stereo_motorcycle()[0]}
for name, rgb in photos.items():
    cv2.imwrite(f"{sys.argv[1]}/skimage-{name}.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
PY
echo "$(ls "$dest/train" | wc -l) training photos in $dest/train, $(ls "$dest/extra" | wc -l) in $dest/extra," \
     "$(ls "$dest/holdout" | wc -l) held out in $dest/holdout, $(ls "$dest/video" | wc -l) clips in $dest/video"
