"""Word lists for RULER's tasks, written here (RULER draws from the ``wonderwords`` lists, not shipped here).

Nouns and adjectives make the needles' keys (``adjective-noun``, as RULER's ``words`` keys); nouns, adjectives
and verbs together are the common-words task's vocabulary. :func:`prose_words` is the larger fallback for long
word lists (RULER falls back to a larger English word list the same way).
"""

from __future__ import annotations

import re
from functools import lru_cache


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())

NOUNS = _words("""
acorn actor airport album anchor angle ankle apple apron arch arrow artist atlas attic author avenue badge bagel
bakery balcony ballet bamboo banana banner barn basket beach beacon beard beaver bench berry bicycle blanket
blossom boat bonnet border bottle boulder bracelet branch bread breeze brick bridge brook broom bucket buffalo
button cabin cactus camel canal candle canoe canyon captain carpet carrot castle cathedral cattle cavern cellar
chapel cherry chimney circus cliff clock cloud coast cobra collar comet compass copper coral cottage cotton
crater crayon creek cricket crown crystal cupboard curtain cushion daisy desert diamond dolphin donkey dragon
drawer eagle earring elbow elephant emerald engine falcon feather fence ferry fiddle field flute forest fountain
fox garden garlic giraffe glacier goose granite grape harbor harvest hazel helmet heron hill honey horizon
hornet island ivory jacket jaguar jelly jewel journal kettle kitten ladder lagoon lantern lemon leopard library
lizard lobster magnet mango maple marble meadow melon mirror monkey mountain museum needle nest novel oak ocean
olive orchard otter owl paddle palace panda parrot pebble pencil pepper piano pillow pirate planet plum pony
puzzle quartz rabbit raccoon radish rainbow raven ribbon river robin rocket saddle salmon sandal satellite
scarf shadow shell shovel silver sparrow spider sponge squirrel statue stone storm sunset swan temple thunder
tiger tomato tractor trumpet tulip tunnel turtle umbrella valley velvet violin volcano wagon walnut whale whistle
willow window wizard wolf yacht zebra
""")

ADJECTIVES = _words("""
able absent agile amber ancient angry anxious aromatic ashen awake bashful bitter blazing bold brave breezy brief
bright brisk broad bumpy busy calm candid careful cheerful chilly clever cloudy clumsy coastal cold colossal cozy
crimson crisp curious damp dapper daring dazzling deep delicate dense distant dizzy dreamy dusty eager early
earnest elegant empty endless fancy fierce filthy flat fluffy foggy fragile frantic frosty funny gentle giant
gleaming glossy golden graceful grand greedy grumpy hairy handsome happy hasty hollow honest humble hungry icy
idle jolly juicy keen kind lanky lazy little lively lonely loud lucky lush majestic mellow merry mighty misty
modern modest muddy narrow neat nervous nimble noble noisy odd orange pale patient plain polite proud purple
quick quiet rapid rare rich rigid rosy rough round rusty sandy savage scarlet shaggy shiny shy silent silky
simple sleepy slim slow smooth snowy soft sour sparkling spicy spotted steady steep sticky stormy strange
striped sturdy sunny swift tall tame tender thick thirsty tidy tiny tired tough tranquil vast vivid warm wary
weary wet wild windy wise witty wooden young zealous
""")

VERBS = _words("""
accept admire answer arrive bake balance bathe blink boil borrow bounce breathe build carry carve chase cheer
chop clap climb collect cook crawl dance deliver dig dive drift earn explore fetch float fold gather glide grow
guard hammer hike hover hum hunt jog juggle jump kneel knit laugh launch lift listen march melt mend mix nod
paint paddle pedal plant polish pour pray pull rescue ride roar row sail scrub sew shiver sing sketch skip
sleep slide sneeze sparkle spin splash stir stroll swim tickle travel tumble wander wave whisper wobble yawn
""")


@lru_cache(maxsize=1)
def common_vocabulary() -> tuple[str, ...]:
    """Nouns, adjectives and verbs, each once, in a fixed (sorted) order."""
    return tuple(sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS)))


@lru_cache(maxsize=1)
def prose_words() -> tuple[str, ...]:
    """Lower-case words of 4 to 10 letters from the standard library's ``pydoc_data.topics``, each once, sorted."""
    from pydoc_data.topics import topics

    found: set[str] = set()
    for text in topics.values():
        found.update(re.findall(r"\b[a-z]{4,10}\b", text))
    return tuple(sorted(found))
